//! Whether a stored session may still be used (SPEC \[4.3\]), and which IP
//! a request comes from.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::store::{Expiry, Record};

/// Why a correctly signed cookie does not give its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No record under the handle (killed, swept, or never stored).
    Missing,
    /// `now - atime > timeout`, or `atime` more than `timeout` ahead.
    Idle,
    /// `now - created > absolute_timeout`, or `created` more than
    /// `absolute_timeout` ahead.
    Absolute,
    /// Used from another IP than the one that created it.
    Ip,
}

impl Expired {
    /// The `reason` label of `session_proxy_sessions_expired_total`.
    pub fn label(self) -> &'static str {
        match self {
            Expired::Missing => "missing",
            Expired::Idle => "idle",
            Expired::Absolute => "absolute",
            Expired::Ip => "ip",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub expiry: Expiry,
    /// `ignore_change_ip = false`.
    pub check_ip: bool,
}

impl Policy {
    /// `Ok` when `record` may serve a request from `client_ip` at `now`.
    pub fn judge(
        &self,
        record: Option<&Record>,
        now: u64,
        client_ip: IpAddr,
    ) -> Result<(), Expired> {
        let record = record.ok_or(Expired::Missing)?;
        // A time further ahead than the timeout counts as further back: a
        // clock that ran ahead (or another program) wrote it, and since a
        // write never moves `atime` back, such a session would otherwise
        // live on, however idle, until the clock caught up with it.
        if now.abs_diff(record.atime) > self.expiry.timeout {
            return Err(Expired::Idle);
        }
        if let Some(absolute) = self.expiry.absolute {
            if now.abs_diff(record.created) > absolute {
                return Err(Expired::Absolute);
            }
        }
        if self.check_ip && !is_same_ip(&record.ip, client_ip) {
            return Err(Expired::Ip);
        }
        Ok(())
    }
}

/// Whether the IP stored at creation is `client_ip`. The stored text is
/// read back, which compares without formatting an address per request,
/// and both are canonical: records written before the peer's address was
/// made canonical name an IPv4 client of a dual-stack listener as
/// `::ffff:a.b.c.d`.
fn is_same_ip(stored: &str, client_ip: IpAddr) -> bool {
    stored
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip.to_canonical() == client_ip.to_canonical())
}

/// The client's IP: the peer's, or, when the peer is a trusted proxy, the
/// rightmost `X-Forwarded-For` entry that is not itself trusted (entries
/// left of it could have been written by the client). `forwarded_for`
/// holds the header's values in the order received.
pub fn client_ip(peer: IpAddr, forwarded_for: &[&[u8]], trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut client = peer.to_canonical();
    if !is_trusted(&client) {
        return client;
    }
    let entries = forwarded_for
        .iter()
        .rev()
        .flat_map(|value| value.rsplit(|&b| b == b','));
    for entry in entries {
        let Some(ip) = std::str::from_utf8(entry)
            .ok()
            .and_then(|text| text.trim().parse::<IpAddr>().ok())
        else {
            // Garbage: trust nothing further left.
            break;
        };
        client = ip.to_canonical();
        if !is_trusted(&client) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(created: u64, atime: u64, ip: &str) -> Record {
        Record {
            data: Default::default(),
            created,
            atime,
            ip: ip.into(),
            ver: 1,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    const A: &str = "192.0.2.1";

    fn policy(timeout: u64, absolute: Option<u64>, check_ip: bool) -> Policy {
        Policy {
            expiry: Expiry { timeout, absolute },
            check_ip,
        }
    }

    #[test]
    fn a_session_lives_until_its_idle_timeout_has_passed() {
        let policy = policy(100, None, false);
        assert_eq!(policy.judge(Some(&record(0, 1000, A)), 1100, ip(A)), Ok(()));
        assert_eq!(
            policy.judge(Some(&record(0, 1000, A)), 1101, ip(A)),
            Err(Expired::Idle)
        );
    }

    #[test]
    fn the_absolute_timeout_counts_from_creation() {
        let policy = policy(100, Some(500), false);
        assert_eq!(
            policy.judge(Some(&record(1000, 1490, A)), 1500, ip(A)),
            Ok(())
        );
        assert_eq!(
            policy.judge(Some(&record(1000, 1590, A)), 1501, ip(A)),
            Err(Expired::Absolute)
        );
    }

    #[test]
    fn a_time_further_ahead_than_its_timeout_is_expired() {
        let policy = policy(100, Some(500), false);
        // Ahead within the timeouts: a clock a little fast elsewhere.
        assert_eq!(
            policy.judge(Some(&record(1500, 1100, A)), 1000, ip(A)),
            Ok(())
        );
        assert_eq!(
            policy.judge(Some(&record(1000, 1101, A)), 1000, ip(A)),
            Err(Expired::Idle)
        );
        assert_eq!(
            policy.judge(Some(&record(u64::MAX, u64::MAX, A)), 1000, ip(A)),
            Err(Expired::Idle)
        );
        assert_eq!(
            policy.judge(Some(&record(1501, 1000, A)), 1000, ip(A)),
            Err(Expired::Absolute)
        );
    }

    #[test]
    fn a_missing_record_is_expired() {
        assert_eq!(
            policy(100, None, false).judge(None, 0, ip(A)),
            Err(Expired::Missing)
        );
    }

    #[test]
    fn another_ip_is_refused_only_when_checked() {
        assert_eq!(
            policy(100, None, true).judge(Some(&record(0, 0, "1.2.3.4")), 0, ip("5.6.7.8")),
            Err(Expired::Ip)
        );
        assert_eq!(
            policy(100, None, false).judge(Some(&record(0, 0, "1.2.3.4")), 0, ip("5.6.7.8")),
            Ok(())
        );
        assert_eq!(
            policy(100, None, true).judge(Some(&record(0, 0, "1.2.3.4")), 0, ip("1.2.3.4")),
            Ok(())
        );
    }

    #[test]
    fn the_stored_ip_is_compared_as_the_address_it_was_written_from() {
        let check = policy(100, None, true);
        let v6 = ip("2001:db8::1");
        assert_eq!(
            check.judge(Some(&record(0, 0, &v6.to_string())), 0, v6),
            Ok(())
        );
        assert_eq!(
            check.judge(Some(&record(0, 0, "not an address")), 0, v6),
            Err(Expired::Ip)
        );
    }

    #[test]
    fn an_ipv4_mapped_address_is_the_ipv4_address_it_maps() {
        let check = policy(100, None, true);
        let mapped = record(0, 0, "::ffff:192.0.2.1");
        assert_eq!(check.judge(Some(&mapped), 0, ip(A)), Ok(()));
        assert_eq!(
            check.judge(Some(&record(0, 0, A)), 0, ip("::ffff:192.0.2.1")),
            Ok(())
        );
        assert_eq!(
            check.judge(Some(&mapped), 0, ip("192.0.2.2")),
            Err(Expired::Ip)
        );
    }

    #[test]
    fn forwarded_for_is_ignored_from_an_untrusted_peer() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = client_ip("1.2.3.4".parse().unwrap(), &[b"9.9.9.9"], &trusted);
        assert_eq!(ip, "1.2.3.4".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_rightmost_untrusted_forwarded_entry_is_the_client() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer = "10.0.0.1".parse().unwrap();
        let ip = client_ip(peer, &[b"6.6.6.6, 7.7.7.7", b"10.0.0.2"], &trusted);
        assert_eq!(ip, "7.7.7.7".parse::<IpAddr>().unwrap());
        let all_trusted = client_ip(peer, &[b"10.1.1.1"], &trusted);
        assert_eq!(all_trusted, "10.1.1.1".parse::<IpAddr>().unwrap());
        let garbage = client_ip(peer, &[b"6.6.6.6, junk, 10.0.0.3"], &trusted);
        assert_eq!(garbage, "10.0.0.3".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(peer, &[], &trusted), peer);
    }
}
