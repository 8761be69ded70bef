//! SHA-256 that resumes from a saved midstate. The prepared ISO's bytes before its first slot are
//! the same in every tenant ISO, so their hash state is computed once (when the prepared ISO is
//! built) and each tenant build hashes only the bytes from the first slot to the end: the output's
//! checksum costs a few MiB of reading instead of a second pass over 3 GB.

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sha2::digest::generic_array::GenericArray;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

/// SHA-256's initial hash value (FIPS 180-4, 5.3.3).
const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// The hash state after the first `len` bytes (`len` a multiple of 64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Midstate {
    pub state: [u32; 8],
    pub len: u64,
}

impl Midstate {
    /// Nothing hashed yet: `finish` from here is a plain SHA-256 of the whole file.
    pub const START: Midstate = Midstate { state: IV, len: 0 };
}

fn compress(state: &mut [u32; 8], block: &[u8]) {
    sha2::compress256(state, std::slice::from_ref(GenericArray::from_slice(block)));
}

/// The state after the whole 64-byte blocks of `path` that lie before `upto`.
pub fn prefix(path: &Path, upto: u64) -> anyhow::Result<Midstate> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = upto / 64 * 64;
    let mut state = IV;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let want = ((len - done) as usize).min(buf.len());
        file.read_exact(&mut buf[..want])
            .with_context(|| format!("reading {}", path.display()))?;
        for block in buf[..want].chunks_exact(64) {
            compress(&mut state, block);
        }
        done += want as u64;
    }
    Ok(Midstate { state, len })
}

/// Hex SHA-256 of the whole of `path`, of which the first `mid.len` bytes are those `mid` covers.
pub fn finish(path: &Path, mid: Midstate) -> anyhow::Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    file.seek(SeekFrom::Start(mid.len))
        .with_context(|| format!("seeking in {}", path.display()))?;
    let mut state = mid.state;
    let mut total = mid.len;
    let mut pending: Vec<u8> = Vec::with_capacity(128);
    let mut buf = vec![0u8; 1 << 20];
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bar = crate::progress::bytes(len.saturating_sub(mid.len), &format!("sha256 {name}"));
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        bar.inc(n as u64);
        total += n as u64;
        let mut data = &buf[..n];
        if !pending.is_empty() {
            let take = (64 - pending.len()).min(data.len());
            pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if pending.len() == 64 {
                compress(&mut state, &pending);
                pending.clear();
            }
        }
        let whole = data.len() / 64 * 64;
        for block in data[..whole].chunks_exact(64) {
            compress(&mut state, block);
        }
        pending.extend_from_slice(&data[whole..]);
    }
    // Padding: 0x80, zeros to 56 mod 64, the message length in bits (big-endian).
    pending.push(0x80);
    while pending.len() % 64 != 56 {
        pending.push(0);
    }
    pending.extend_from_slice(&(total * 8).to_be_bytes());
    for block in pending.chunks_exact(64) {
        compress(&mut state, block);
    }
    bar.finish_and_clear();
    let digest: Vec<u8> = state.iter().flat_map(|w| w.to_be_bytes()).collect();
    Ok(kernex_protocol::token::hex(&digest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest as _, Sha256};

    #[test]
    fn resuming_gives_the_plain_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for size in [0usize, 1, 55, 56, 63, 64, 65, 127, 128, 1000, 3 << 20] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(&path, &data).unwrap();
            let expected = kernex_protocol::token::hex(&Sha256::digest(&data));
            assert_eq!(
                finish(&path, Midstate::START).unwrap(),
                expected,
                "size {size}, from the start"
            );
            for upto in [0u64, 1, 64, 100, size as u64 / 2, size as u64] {
                let mid = prefix(&path, upto.min(size as u64)).unwrap();
                assert_eq!(
                    finish(&path, mid).unwrap(),
                    expected,
                    "size {size}, resumed at {upto}"
                );
            }
        }
    }
}
