//! Owns `<output_dir>/index.jsonl`: one line per processed recording (path, source, external id,
//! interaction id, the result files written), so results join a CDR or CRM without the database.
//!
//! Each line is one `write` to a file opened with `O_APPEND`, then flushed to disk, so lines from
//! one daemon never interleave. A crash can leave two kinds of damage, both repaired here: a torn
//! last line (the next append starts on a fresh line, so a reader skips one unparsable line), and
//! a line written just before a crash whose job was not yet marked processed, which would be
//! written again: the ids in the index's tail are read at start and not written twice.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

pub const FILE_NAME: &str = "index.jsonl";
/// How much of the index's end is read at start. Only the lines written in the moment before a
/// crash can come again, and they are the last ones.
const TAIL: u64 = 256 * 1024;

#[derive(Debug, Serialize)]
pub struct Entry {
    pub path: String,
    pub source: Option<String>,
    pub external_id: Option<String>,
    pub interaction_id: String,
    pub results: Vec<String>,
}

pub struct Index {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    /// Interaction ids in the tail found at start; emptied as they are met.
    recent: HashSet<String>,
    /// The file may end in a torn line: start the next append with a newline.
    torn: bool,
}

impl Index {
    /// Looks at the end of an existing index (nothing is created until the first append).
    pub fn open(output_dir: &Path) -> Index {
        let path = output_dir.join(FILE_NAME);
        let (recent, torn) = read_tail(&path).unwrap_or_default();
        Index {
            path,
            state: Mutex::new(State { recent, torn }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line, unless this interaction's line was already written just before a crash.
    pub fn append(&self, e: &Entry) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.recent.remove(&e.interaction_id) {
            return Ok(());
        }
        let mut line = Vec::with_capacity(256);
        if st.torn {
            line.push(b'\n');
        }
        serde_json::to_writer(&mut line, e).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut f = open_locked(&self.path, true)?.expect("created");
        f.write_all(&line)?;
        f.sync_data()?;
        st.torn = false;
        Ok(())
    }
}

/// Opens the index for appending, holding its `flock`, and makes sure the file locked is the one
/// at the path: [`remove`] (`callferry forget`, another process) replaces the file by rename while
/// holding the lock of the old one, so an appender that waited on the old one opens the new one
/// instead of writing into a file nobody will read. `create`: false gives None for no index.
fn open_locked(path: &Path, create: bool) -> std::io::Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    loop {
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .create(create)
            .append(true)
            .mode(0o640)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // SAFETY: flock on a descriptor we own; blocking, so this runs off the runtime thread.
        while unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let held = f.metadata()?;
        match std::fs::metadata(path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => return Ok(Some(f)),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// The lines of the index under `output_dir` for these interaction ids, as written: what
/// `callferry forget` removes, with the result files each names.
pub fn lines_for(output_dir: &Path, ids: &HashSet<String>) -> std::io::Result<Vec<Entry>> {
    use std::io::BufRead;
    let f = match std::fs::File::open(output_dir.join(FILE_NAME)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).split(b'\n') {
        if let Some(e) = parse_for(&line?, ids) {
            out.push(e);
        }
    }
    Ok(out)
}

fn parse_for(line: &[u8], ids: &HashSet<String>) -> Option<Entry> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    let id = v.get("interaction_id")?.as_str()?;
    if !ids.contains(id) {
        return None;
    }
    let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    Some(Entry {
        path: text("path").unwrap_or_default(),
        source: text("source"),
        external_id: text("external_id"),
        interaction_id: id.to_string(),
        results: v
            .get("results")
            .and_then(|r| r.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Rewrites the index under `output_dir` without the lines of these interaction ids, atomically:
/// a temporary file beside it, fsynced, renamed over it, and the folder fsynced. Readers see the
/// old index or the new one. It holds the index's lock throughout, so a daemon appending at the
/// same moment waits and then appends to the new file (see [`open_locked`]); no line is lost.
/// Other lines, a torn last one included, are copied byte for byte. Returns how many lines went.
pub fn remove(output_dir: &Path, ids: &HashSet<String>) -> std::io::Result<usize> {
    use std::io::{BufRead, BufWriter};
    use std::os::unix::fs::PermissionsExt;
    let path = output_dir.join(FILE_NAME);
    let Some(old) = open_locked(&path, false)? else {
        return Ok(0);
    };
    let mut reader = std::io::BufReader::new(&old);
    let mut tmp = tempfile::Builder::new()
        .prefix(".index.jsonl.")
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o640))
        .tempfile_in(output_dir)?;
    let mut removed = 0;
    {
        let mut w = BufWriter::new(tmp.as_file_mut());
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            let body = line.strip_suffix(b"\n").unwrap_or(&line);
            if parse_for(body, ids).is_some() {
                removed += 1;
            } else {
                w.write_all(&line)?;
            }
        }
        w.flush()?;
    }
    if removed == 0 {
        return Ok(0);
    }
    tmp.as_file().sync_all()?;
    tmp.persist(&path).map_err(|e| e.error)?;
    std::fs::File::open(output_dir)?.sync_all()?;
    // The old file's lock goes with `old`, after the rename: a waiting appender then finds the
    // new file at the path.
    drop(old);
    Ok(removed)
}

fn read_tail(path: &Path) -> std::io::Result<(HashSet<String>, bool)> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(TAIL);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.read_to_end(&mut buf)?;
    let torn = !buf.is_empty() && !buf.ends_with(b"\n");
    let mut ids = HashSet::new();
    // The first line may be cut by where the tail starts; it fails to parse and is skipped.
    for line in buf.split(|b| *b == b'\n') {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line)
            && let Some(id) = v.get("interaction_id").and_then(|i| i.as_str())
        {
            ids.insert(id.to_string());
        }
    }
    Ok((ids, torn))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> Entry {
        Entry {
            path: "/rec/a.wav".into(),
            source: None,
            external_id: Some("1764584100.42".into()),
            interaction_id: id.into(),
            results: vec!["/out/a.transcript.json".into()],
        }
    }

    fn lines(p: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    #[test]
    fn a_crash_leaves_neither_a_duplicate_nor_a_glued_line() {
        let d = tempfile::tempdir().unwrap();
        let ix = Index::open(d.path());
        ix.append(&entry("iid-1")).unwrap();
        ix.append(&entry("iid-2")).unwrap();
        // A crash after iid-2's line, before its job was marked processed, and in the middle of
        // a third line.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(ix.path())
            .unwrap();
        f.write_all(b"{\"path\":\"/rec/c.wav\",\"inter").unwrap();
        drop(f);

        let again = Index::open(d.path());
        again.append(&entry("iid-2")).unwrap(); // processed again after the restart
        again.append(&entry("iid-3")).unwrap();
        again.append(&entry("iid-2")).unwrap(); // a later, real second line is kept
        let ids: Vec<String> = lines(again.path())
            .iter()
            .map(|v| v["interaction_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids, ["iid-1", "iid-2", "iid-3", "iid-2"]);
        let text = std::fs::read_to_string(again.path()).unwrap();
        assert_eq!(
            text.lines().count(),
            5,
            "the torn line stays alone:\n{text}"
        );
        assert_eq!(lines(again.path())[0]["external_id"], "1764584100.42");
    }

    /// `callferry forget` rewrites the index while a daemon appends to it: every appended line
    /// survives, only the forgotten ones go, and the result is one line per append.
    #[test]
    fn a_rewrite_under_concurrent_appends_loses_no_line() {
        let d = tempfile::tempdir().unwrap();
        let ix = std::sync::Arc::new(Index::open(d.path()));
        for i in 0..50 {
            ix.append(&entry(&format!("old-{i}"))).unwrap();
        }
        let writer = {
            let ix = ix.clone();
            std::thread::spawn(move || {
                for i in 0..300 {
                    ix.append(&entry(&format!("new-{i}"))).unwrap();
                }
            })
        };
        let mut removed = 0;
        for i in 0..50 {
            let ids: HashSet<String> = [format!("old-{i}")].into();
            assert_eq!(lines_for(d.path(), &ids).unwrap().len(), 1);
            removed += remove(d.path(), &ids).unwrap();
        }
        writer.join().unwrap();
        assert_eq!(removed, 50);
        let ids: Vec<String> = lines(ix.path())
            .iter()
            .map(|v| v["interaction_id"].as_str().unwrap().to_string())
            .collect();
        let want: Vec<String> = (0..300).map(|i| format!("new-{i}")).collect();
        assert_eq!(ids, want);
        let text = std::fs::read_to_string(ix.path()).unwrap();
        assert_eq!(text.lines().count(), 300);
        let leftovers = std::fs::read_dir(d.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary files left");
    }
}
