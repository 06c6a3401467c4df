//! Built-in IPAM (IPv4 only): pure functions for address and subnet allocation.
//!
//! Addresses are handled as closed ranges `[lo, hi]` of host addresses. The network and
//! broadcast addresses of a subnet are never allocatable; everything else that must not be
//! handed out (gateway, aux addresses, addresses in use) is passed in as the `used` set.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Whether two prefixes share at least one address.
pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Docker's default address pools, in the order they are tried: 172.17.0.0/16 through
/// 172.31.0.0/16, then 192.168.0.0/16 split into /20s.
pub fn default_pool() -> impl Iterator<Item = Ipv4Net> {
    let b16 = (17u8..=31).map(|b| Ipv4Net::new(Ipv4Addr::new(172, b, 0, 0), 16).unwrap());
    let c20 = (0u8..16).map(|i| Ipv4Net::new(Ipv4Addr::new(192, 168, i * 16, 0), 20).unwrap());
    b16.chain(c20)
}

/// The first subnet of the default pool that overlaps none of `taken`.
pub fn choose_subnet(taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    default_pool().find(|c| !taken.iter().any(|t| overlaps(*c, *t)))
}

/// Whether `ip` is the network or the broadcast address of `subnet`.
pub fn is_network_or_broadcast(subnet: Ipv4Net, ip: Ipv4Addr) -> bool {
    ip == subnet.network() || ip == subnet.broadcast()
}

/// The first host address of `subnet` (`.1` of a /24): Docker's default gateway.
/// `None` for /31 and /32, which have no room for hosts in Docker's model.
pub fn first_host(subnet: Ipv4Net) -> Option<Ipv4Addr> {
    host_bounds(subnet).map(|(lo, _)| lo)
}

/// First and last host address of `subnet` (network and broadcast excluded).
pub fn host_bounds(subnet: Ipv4Net) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if subnet.prefix_len() > 30 {
        return None;
    }
    let lo = u32::from(subnet.network()) + 1;
    let hi = u32::from(subnet.broadcast()) - 1;
    Some((Ipv4Addr::from(lo), Ipv4Addr::from(hi)))
}

/// The range addresses are allocated from: `range` (or the whole subnet) restricted to the
/// subnet's host addresses. `None` if that leaves nothing.
pub fn alloc_bounds(subnet: Ipv4Net, range: Option<Ipv4Net>) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let (hlo, hhi) = host_bounds(subnet)?;
    let r = range.unwrap_or(subnet);
    let lo = r.network().max(hlo);
    let hi = r.broadcast().min(hhi);
    (lo <= hi).then_some((lo, hi))
}

/// Number of addresses in `[lo, hi]`.
pub fn count(lo: Ipv4Addr, hi: Ipv4Addr) -> u64 {
    if lo > hi {
        0
    } else {
        u64::from(u32::from(hi) - u32::from(lo)) + 1
    }
}

/// The lowest address in `[lo, hi]` not in `used`.
///
/// Walks only the used addresses from `lo` up to the first gap, so the cost is the number of
/// used addresses below the result, not the size of the range.
pub fn lowest_free(lo: Ipv4Addr, hi: Ipv4Addr, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    if lo > hi {
        return None;
    }
    let mut cand = u32::from(lo);
    let hi = u32::from(hi);
    for u in used.range(lo..=Ipv4Addr::from(hi)) {
        let u = u32::from(*u);
        if u > cand {
            break;
        }
        // u == cand: taken, try the next one.
        if cand == hi {
            return None;
        }
        cand += 1;
    }
    Some(Ipv4Addr::from(cand))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn overlap() {
        assert!(overlaps(net("10.0.0.0/8"), net("10.1.0.0/16")));
        assert!(overlaps(net("10.1.0.0/16"), net("10.0.0.0/8")));
        assert!(overlaps(net("10.1.0.0/16"), net("10.1.0.0/16")));
        assert!(!overlaps(net("10.1.0.0/16"), net("10.2.0.0/16")));
        assert!(!overlaps(net("192.168.0.0/20"), net("192.168.16.0/20")));
    }

    #[test]
    fn pool_order_and_size() {
        let p: Vec<_> = default_pool().collect();
        assert_eq!(p.len(), 15 + 16);
        assert_eq!(p[0], net("172.17.0.0/16"));
        assert_eq!(p[14], net("172.31.0.0/16"));
        assert_eq!(p[15], net("192.168.0.0/20"));
        assert_eq!(p[30], net("192.168.240.0/20"));
    }

    #[test]
    fn choose_skips_taken() {
        assert_eq!(choose_subnet(&[]), Some(net("172.17.0.0/16")));
        // A host route inside 172.17/16 and a network on 172.18/16.
        let taken = [net("172.17.5.0/24"), net("172.18.0.0/16")];
        assert_eq!(choose_subnet(&taken), Some(net("172.19.0.0/16")));
        // A wide host route covers all of 172.16/12: fall through to 192.168/20s.
        let taken = [net("172.16.0.0/12"), net("192.168.0.0/24")];
        assert_eq!(choose_subnet(&taken), Some(net("192.168.16.0/20")));
        // Everything taken.
        let taken = [net("172.16.0.0/12"), net("192.168.0.0/16")];
        assert_eq!(choose_subnet(&taken), None);
    }

    #[test]
    fn bounds() {
        assert_eq!(
            host_bounds(net("10.0.0.0/24")),
            Some((ip("10.0.0.1"), ip("10.0.0.254")))
        );
        assert_eq!(
            host_bounds(net("10.0.0.0/30")),
            Some((ip("10.0.0.1"), ip("10.0.0.2")))
        );
        assert_eq!(host_bounds(net("10.0.0.0/31")), None);
        assert_eq!(first_host(net("172.17.0.0/16")), Some(ip("172.17.0.1")));
        assert_eq!(
            alloc_bounds(net("10.0.0.0/24"), Some(net("10.0.0.128/25"))),
            Some((ip("10.0.0.128"), ip("10.0.0.254")))
        );
        assert_eq!(
            alloc_bounds(net("10.0.0.0/24"), Some(net("10.0.0.0/32"))),
            None,
            "a range holding only the network address is empty"
        );
        assert_eq!(count(ip("10.0.0.1"), ip("10.0.0.254")), 254);
        assert_eq!(count(ip("10.0.0.2"), ip("10.0.0.1")), 0);
        assert!(is_network_or_broadcast(
            net("10.0.0.0/24"),
            ip("10.0.0.255")
        ));
        assert!(is_network_or_broadcast(net("10.0.0.0/24"), ip("10.0.0.0")));
        assert!(!is_network_or_broadcast(net("10.0.0.0/24"), ip("10.0.0.1")));
    }

    #[test]
    fn lowest_free_skips_used() {
        let used: BTreeSet<_> = [ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.4")].into();
        assert_eq!(
            lowest_free(ip("10.0.0.1"), ip("10.0.0.6"), &used),
            Some(ip("10.0.0.3"))
        );
        assert_eq!(
            lowest_free(ip("10.0.0.4"), ip("10.0.0.6"), &used),
            Some(ip("10.0.0.5"))
        );
        assert_eq!(lowest_free(ip("10.0.0.1"), ip("10.0.0.2"), &used), None);
        assert_eq!(lowest_free(ip("10.0.0.3"), ip("10.0.0.2"), &used), None);
        // A used address outside the range does not matter.
        let used: BTreeSet<_> = [ip("10.0.0.9")].into();
        assert_eq!(lowest_free(ip("10.0.0.9"), ip("10.0.0.9"), &used), None);
        assert_eq!(
            lowest_free(ip("10.0.0.8"), ip("10.0.0.9"), &used),
            Some(ip("10.0.0.8"))
        );
        // Top of the address space does not overflow.
        let used: BTreeSet<_> = [ip("255.255.255.255")].into();
        assert_eq!(
            lowest_free(ip("255.255.255.255"), ip("255.255.255.255"), &used),
            None
        );
    }

    #[test]
    fn lowest_free_large_subnet() {
        let (lo, hi) = host_bounds(net("10.0.0.0/16")).unwrap();
        let mut used = BTreeSet::new();
        for _ in 0..5000 {
            let a = lowest_free(lo, hi, &used).unwrap();
            assert!(used.insert(a));
        }
        assert_eq!(used.len(), 5000);
        assert_eq!(*used.last().unwrap(), Ipv4Addr::from(u32::from(lo) + 4999));
        // Free one in the middle: it is the next one handed out.
        used.remove(&ip("10.0.1.0"));
        assert_eq!(lowest_free(lo, hi, &used), Some(ip("10.0.1.0")));
    }
}
