//! Token-bucket rate limits: sends per client address, inbound bytes per recipient,
//! account creations per client address.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Buckets are dropped once refilled and idle; the map is swept at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// ... and only when it holds more keys than this.
const SWEEP_ABOVE: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
struct State<K> {
    buckets: HashMap<K, Bucket>,
    last_sweep: Instant,
}

/// A map of token buckets, one per key, each holding at most `burst` tokens and refilled
/// at `rate` tokens per second. A rate of 0 disables the limit.
#[derive(Debug)]
pub struct Limiter<K> {
    rate: f64,
    burst: f64,
    state: Mutex<State<K>>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    pub fn new(rate_per_sec: f64, burst: f64) -> Self {
        Limiter {
            rate: rate_per_sec.max(0.0),
            burst: burst.max(1.0),
            state: Mutex::new(State {
                buckets: HashMap::new(),
                last_sweep: Instant::now(),
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.rate > 0.0
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + dt * self.rate).min(self.burst);
        b.at = now;
    }

    /// Takes `cost` tokens from `key`'s bucket; if it holds fewer, takes nothing and
    /// returns how long until it will hold `cost` (for `Retry-After`; at most an hour).
    pub fn try_take(&self, key: &K, cost: f64) -> Result<(), Duration> {
        if !self.enabled() {
            return Ok(());
        }
        let now = Instant::now();
        let mut st = self.state.lock();
        if st.buckets.len() > SWEEP_ABOVE && now.duration_since(st.last_sweep) > SWEEP_EVERY {
            st.last_sweep = now;
            let (rate, burst) = (self.rate, self.burst);
            st.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
        let b = st.buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        self.refill(b, now);
        if b.tokens >= cost {
            b.tokens -= cost;
            Ok(())
        } else {
            let wait = ((cost.min(self.burst) - b.tokens) / self.rate).clamp(0.0, 3600.0);
            Err(Duration::from_secs_f64(wait))
        }
    }

    /// Gives back tokens taken for work that was then refused.
    pub fn refund(&self, key: &K, cost: f64) {
        if !self.enabled() {
            return;
        }
        if let Some(b) = self.state.lock().buckets.get_mut(key) {
            b.tokens = (b.tokens + cost).min(self.burst);
        }
    }
}

/// The key for per-client limits: the IPv4 address, or the /64 of an IPv6 address (one
/// host usually has a whole /64).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_limits_and_refills() {
        let l = Limiter::new(1000.0, 3.0);
        assert!(l.try_take(&1, 1.0).is_ok());
        assert!(l.try_take(&1, 1.0).is_ok());
        assert!(l.try_take(&1, 1.0).is_ok());
        let wait = l.try_take(&1, 1.0).unwrap_err();
        assert!(wait <= Duration::from_millis(1), "{wait:?}");
        assert!(l.try_take(&2, 1.0).is_ok(), "keys are independent");
        std::thread::sleep(Duration::from_millis(5));
        assert!(l.try_take(&1, 1.0).is_ok());
        let off = Limiter::new(0.0, 1.0);
        for _ in 0..100 {
            assert!(off.try_take(&1, 5.0).is_ok());
        }
    }

    #[test]
    fn refund_and_cost() {
        let l = Limiter::new(0.001, 100.0);
        assert!(l.try_take(&"q", 60.0).is_ok());
        // 40 tokens left at 0.001/s: 20 more take 20,000 s, told as the one-hour cap.
        assert_eq!(
            l.try_take(&"q", 60.0).unwrap_err(),
            Duration::from_secs(3600)
        );
        l.refund(&"q", 60.0);
        assert!(l.try_take(&"q", 60.0).is_ok());
    }

    #[test]
    fn ipv6_grouped_by_64() {
        let a: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        let m: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(client_key(m), "127.0.0.1".parse::<IpAddr>().unwrap());
    }
}
