//! Parley load-test harness (being built for issue 4).
