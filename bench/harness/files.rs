//! The recordings the scenarios feed the daemon (complete WAVs of incompressible noise, each one
//! different), and the check that the fake received each exactly once, whole, under its own name.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Result, anyhow, bail};
use callferry_fake::InteractionRecord;

/// A pseudo-random block (xorshift), so nothing on the path can compress it.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `n` recordings of `size` bytes named `{prefix}{i:06}.wav` into `dir` (spread over
/// `per_dir`-sized subfolders when given), with an mtime an hour ago: a backlog, complete at once.
pub fn make_files(
    dir: &Path,
    n: usize,
    size: usize,
    prefix: &str,
    per_dir: Option<usize>,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let block = noise(size.min(1 << 20), 7);
    let old = SystemTime::now() - Duration::from_secs(3600);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let folder = match per_dir {
            Some(k) => dir.join(format!("d{:04}", i / k)),
            None => dir.to_path_buf(),
        };
        if per_dir.is_some() && i % per_dir.unwrap_or(1) == 0 {
            std::fs::create_dir_all(&folder)?;
        }
        let path = folder.join(format!("{prefix}{i:06}.wav"));
        write_file(&path, size, &block, i as u64)?;
        File::options()
            .write(true)
            .open(&path)?
            .set_times(std::fs::FileTimes::new().set_modified(old))?;
        out.push(path);
    }
    Ok(out)
}

/// A canonical 44-byte WAV header (8 kHz, 16-bit mono PCM) whose sizes agree with a file of
/// `size` bytes, as a recorder leaves it once the call is over.
fn wav_header(size: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&(size as u32 - 8).to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&[1, 0, 1, 0, 0x40, 0x1F, 0, 0, 0x80, 0x3E, 0, 0, 2, 0, 16, 0]);
    h.extend_from_slice(b"data");
    h.extend_from_slice(&(size as u32 - 44).to_le_bytes());
    h
}

/// A complete WAV of `size` bytes: header, an 8-byte serial (so every file differs), then the block
/// repeated as "audio".
pub fn write_file(path: &Path, size: usize, block: &[u8], serial: u64) -> Result<()> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut head = wav_header(size.max(52));
    head.extend_from_slice(&serial.to_le_bytes());
    let mut left = size.max(52);
    f.write_all(&head)?;
    left -= head.len();
    while left > 0 {
        let k = left.min(block.len());
        f.write_all(&block[..k])?;
        left -= k;
    }
    f.flush()?;
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = std::io::Read::read(&mut f, &mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Checks the fake received each file exactly once, whole, under its own name: one declare, one
/// stored upload, the right size (and, when `check_hash`, the right SHA-256).
pub fn check_exactly_once(
    recs: &[InteractionRecord],
    files: &[PathBuf],
    check_hash: bool,
) -> Result<()> {
    use std::collections::HashMap;
    let mut by_name: HashMap<String, &InteractionRecord> = HashMap::new();
    for r in recs {
        let name = r.declare_body["originalFilename"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if by_name.insert(name.clone(), r).is_some() {
            bail!("{name} was declared twice");
        }
    }
    if recs.len() != files.len() {
        bail!("{} interactions for {} files", recs.len(), files.len());
    }
    for f in files {
        let name = f
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let r = by_name
            .get(&name)
            .ok_or_else(|| anyhow!("{name} was never declared"))?;
        let stored: Vec<_> = r.uploads.iter().filter(|u| u.stored).collect();
        if stored.len() != 1 {
            bail!("{name}: {} stored uploads", stored.len());
        }
        let u = stored[0];
        let size = std::fs::metadata(f)?.len();
        if u.size != size || u.field_name != name {
            bail!(
                "{name}: stored {} bytes as field {:?}, expected {size} as {name:?}",
                u.size,
                u.field_name
            );
        }
        if check_hash && u.sha256 != sha256_file(f)? {
            bail!("{name}: content differs");
        }
    }
    Ok(())
}
