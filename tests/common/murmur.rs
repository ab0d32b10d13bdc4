//! Kafka's Java partitioner (murmur2), to check that keys land where Java clients put them.

/// Kafka's Java `Utils.murmur2`: MurmurHash2, seed 0x9747b28c, little-endian 4-byte blocks,
/// returned as the Java signed int.
pub fn java_murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        // Java's switch falls through from 3 to 2 to 1.
        for (i, &b) in rest.iter().enumerate().rev() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java producer's default partitioner picks for a non-null key:
/// `toPositive(murmur2(key)) % partitions` (librdkafka's `murmur2_random` does the same).
pub fn java_murmur2_partition(key: &[u8], partitions: i32) -> i32 {
    assert!(partitions > 0, "partition count must be positive");
    (java_murmur2(key) & 0x7fff_ffff) % partitions
}
