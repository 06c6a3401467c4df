//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, section 3.4): each backend has a permutation of the table's
//! `M` slots (M prime, so every `skip` generates a full cycle); backends take turns filling
//! their next preferred free slot. Every backend gets `M/N` slots give or take one, and a
//! change to the backend set moves few slots of the backends that stay.
//!
//! The table depends only on the set of backends (sorted by address) and `M`, and the hash
//! is FNV-1a (Fowler, Noll, Vo; 64-bit), so every node computes the same table.

/// FNV-1a 64-bit over `seed` then `data`.
fn fnv1a(seed: u8, data: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for &b in std::iter::once(&seed).chain(data) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// The lookup table: for each of the `m` slots, the backend it maps to (a value from
/// `backends`). Empty when there are no backends. `m` must be prime.
pub fn table<K: AsRef<[u8]> + Ord + Clone>(backends: &[K], m: u32) -> Vec<K> {
    let mut keys: Vec<K> = backends.to_vec();
    keys.sort();
    keys.dedup();
    if keys.is_empty() {
        return Vec::new();
    }
    let m64 = u64::from(m);
    let perms: Vec<(u64, u64)> = keys
        .iter()
        .map(|k| {
            let offset = fnv1a(0x01, k.as_ref()) % m64;
            let skip = fnv1a(0x02, k.as_ref()) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; keys.len()];
    let mut entry: Vec<Option<usize>> = vec![None; m as usize];
    let mut filled = 0usize;
    'fill: loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m64;
            while entry[c as usize].is_some() {
                next[i] += 1;
                c = (offset + next[i] * skip) % m64;
            }
            entry[c as usize] = Some(i);
            next[i] += 1;
            filled += 1;
            if filled == m as usize {
                break 'fill;
            }
        }
    }
    entry
        .into_iter()
        .map(|e| keys[e.expect("every slot filled")].clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const M: u32 = netctl_common::MAGLEV_M;

    fn ips(n: u8) -> Vec<[u8; 4]> {
        (0..n).map(|i| [10, 0, 0, 10 + i]).collect()
    }

    fn shares(t: &[[u8; 4]]) -> BTreeMap<[u8; 4], usize> {
        let mut m = BTreeMap::new();
        for k in t {
            *m.entry(*k).or_default() += 1;
        }
        m
    }

    #[test]
    fn every_backend_gets_an_even_share() {
        for n in [1u8, 2, 3, 7, 50] {
            let t = table(&ips(n), M);
            assert_eq!(t.len(), M as usize);
            let s = shares(&t);
            assert_eq!(s.len(), n as usize);
            let even = M as usize / n as usize;
            for (k, c) in s {
                assert!(
                    c.abs_diff(even) <= 1,
                    "{n} backends: {k:?} has {c} slots, even is {even}"
                );
            }
        }
    }

    #[test]
    fn order_of_backends_does_not_matter() {
        let mut b = ips(5);
        let t1 = table(&b, M);
        b.reverse();
        assert_eq!(t1, table(&b, M));
    }

    #[test]
    fn removing_a_backend_moves_few_other_slots() {
        let b = ips(4);
        let before = table(&b, M);
        let gone = b[1];
        let after = table(&[b[0], b[2], b[3]], M);
        let kept = before
            .iter()
            .zip(&after)
            .filter(|(x, _)| **x != gone)
            .filter(|(x, y)| x == y)
            .count();
        let others = before.iter().filter(|x| **x != gone).count();
        // The paper reports small disruption; with 4 -> 3 backends at M = 1021 nearly all
        // slots of the staying backends stay.
        assert!(
            kept * 100 >= others * 90,
            "{kept} of {others} slots of staying backends kept"
        );
        assert!(!after.contains(&gone));
    }

    #[test]
    fn no_backends_no_table() {
        assert!(table::<[u8; 4]>(&[], M).is_empty());
    }
}
