//! The bundled scenarios run within the gateway's default rate limits: their clients all
//! connect from 127.0.0.1, which the per-address limits spare by default, and no user sends
//! more than half its per-user budget in messages (the other half is room for what else a
//! client sends: resumes, lists, presence, read markers, resends after a reconnect). A
//! scenario that needs more must raise the limits of the platform it runs on.

use std::net::IpAddr;
use std::path::Path;

use parley_loadtest::plan::Plan;
use parley_loadtest::scenario::Scenario;
use parley_services::config::RateLimitsConfig;

#[test]
fn every_bundled_scenario_sends_within_the_default_rate_limits() {
    let limits = RateLimitsConfig::default();
    let loopback = IpAddr::from([127, 0, 0, 1]);
    assert!(
        limits.exempt_networks.iter().any(|n| n.contains(&loopback)),
        "the harness connects from 127.0.0.1"
    );
    let budget = f64::from(limits.user_per_sec) / 2.0;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let scenario = Scenario::load(&path).unwrap();
        let plan = Plan::build(&scenario, "t", scenario.gateways);
        let peak = plan.phases.iter().map(|p| p.rate).fold(0.0, f64::max);
        let mut share_of_user = vec![0.0; plan.users.len()];
        for slot in &plan.slots {
            share_of_user[plan.connections[slot.connection].user] += slot.share.weight;
        }
        let busiest = share_of_user.iter().copied().fold(0.0, f64::max) * peak;
        assert!(
            busiest <= budget,
            "{}: its busiest user sends {busiest:.1} messages/s at the peak, more than half \
             of gateway.rate_limits.user_per_sec ({}): raise the limits for it",
            scenario.name,
            limits.user_per_sec
        );
        checked.push((scenario.name, busiest));
    }
    assert!(checked.len() >= 7, "scenarios found: {checked:?}");
    println!("busiest user's messages/s per scenario: {checked:?}");
}
