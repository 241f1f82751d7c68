//! The open-loop schedule: when each send is due, fixed before the run starts.
//!
//! A send's latency is measured from its scheduled time, not from when the client got round
//! to sending it, so a stalled client or a back-pressured socket shows up as latency instead
//! of silently lowering the offered rate (no coordinated omission).

use std::time::Duration;

/// A stretch of time with one system-wide rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase {
    /// From the start of sending.
    pub start: Duration,
    pub length: Duration,
    /// Messages per second across all slots.
    pub rate: f64,
}

/// One sender in one conversation, with its share of the system-wide rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlotShare {
    /// Fraction of the system-wide rate this slot sends (all slots add up to 1).
    pub weight: f64,
    /// Where in its own interval this slot's sends fall (0..1), so that slots interleave
    /// evenly instead of all firing at once.
    pub phase_offset: f64,
}

/// The equal shares of `slots` slots, interleaved evenly.
pub fn equal_shares(slots: usize) -> Vec<SlotShare> {
    (0..slots)
        .map(|j| SlotShare {
            weight: 1.0 / slots as f64,
            phase_offset: j as f64 / slots as f64,
        })
        .collect()
}

/// Shares when each sending user sends the same rate, split evenly over its conversations:
/// `slots_of_user[u]` is how many slots user `u` has (users with none are left out). Slot
/// order is user by user.
pub fn per_user_shares(slots_of_user: &[usize]) -> Vec<SlotShare> {
    let users = slots_of_user.iter().filter(|&&n| n > 0).count();
    let total: usize = slots_of_user.iter().sum();
    let mut shares = Vec::with_capacity(total);
    for &n in slots_of_user.iter().filter(|&&n| n > 0) {
        for _ in 0..n {
            shares.push(SlotShare {
                weight: 1.0 / (users as f64 * n as f64),
                phase_offset: shares.len() as f64 / total as f64,
            });
        }
    }
    shares
}

/// The scheduled times of one slot's sends, from the start of sending, in order.
pub fn slot_times(share: SlotShare, phases: &[Phase]) -> impl Iterator<Item = Duration> + '_ {
    phases.iter().flat_map(move |phase| {
        let rate = phase.rate * share.weight;
        let interval = if rate > 0.0 {
            1.0 / rate
        } else {
            f64::INFINITY
        };
        let start = phase.start.as_secs_f64();
        let end = start + phase.length.as_secs_f64();
        let first = start + share.phase_offset * interval;
        (0u64..)
            .map(move |n| first + n as f64 * interval)
            .take_while(move |&t| t < end)
            .map(Duration::from_secs_f64)
    })
}

/// Consecutive phases of `step` each, one per rate.
pub fn stepped(rates: &[f64], step: Duration) -> Vec<Phase> {
    rates
        .iter()
        .enumerate()
        .map(|(i, &rate)| Phase {
            start: step * i as u32,
            length: step,
            rate,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_times(shares: &[SlotShare], phases: &[Phase]) -> Vec<Duration> {
        let mut times: Vec<Duration> = shares
            .iter()
            .flat_map(|&s| slot_times(s, phases).collect::<Vec<_>>())
            .collect();
        times.sort();
        times
    }

    #[test]
    fn the_system_rate_is_met_and_evenly_spread() {
        let phases = [Phase {
            start: Duration::ZERO,
            length: Duration::from_secs(10),
            rate: 200.0,
        }];
        let times = all_times(&equal_shares(40), &phases);
        assert_eq!(times.len(), 2000);
        // Interleaved: every gap between consecutive sends is the system interval, 5 ms.
        for pair in times.windows(2) {
            let gap = (pair[1] - pair[0]).as_secs_f64();
            assert!((gap - 0.005).abs() < 1e-6, "gap {gap}");
        }
        assert!(times.last().unwrap() < &Duration::from_secs(10));
    }

    #[test]
    fn each_slot_is_in_order_and_inside_its_phase() {
        let phases = stepped(&[10.0, 20.0], Duration::from_secs(2));
        let shares = equal_shares(3);
        for share in &shares {
            let times: Vec<_> = slot_times(*share, &phases).collect();
            assert!(times.windows(2).all(|w| w[0] < w[1]));
        }
        let times = all_times(&shares, &phases);
        let first = times
            .iter()
            .filter(|t| **t < Duration::from_secs(2))
            .count();
        // 10/s for 2 s, then 20/s for 2 s; each slot rounds its own share.
        assert!((19..=21).contains(&first), "{first}");
        assert!((59..=61).contains(&times.len()), "{}", times.len());
    }

    #[test]
    fn per_user_shares_split_a_users_rate_over_its_slots() {
        // User 0 sends in two conversations, user 1 in one, user 2 in none.
        let shares = per_user_shares(&[2, 1, 0]);
        assert_eq!(shares.len(), 3);
        assert!((shares[0].weight - 0.25).abs() < 1e-12);
        assert!((shares[1].weight - 0.25).abs() < 1e-12);
        assert!((shares[2].weight - 0.5).abs() < 1e-12);
        let total: f64 = shares.iter().map(|s| s.weight).sum();
        assert!((total - 1.0).abs() < 1e-12);
    }

    #[test]
    fn a_zero_rate_schedules_nothing() {
        let phases = [Phase {
            start: Duration::ZERO,
            length: Duration::from_secs(5),
            rate: 0.0,
        }];
        assert_eq!(slot_times(equal_shares(1)[0], &phases).count(), 0);
    }
}
