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
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&self.path)?;
        f.write_all(&line)?;
        f.sync_data()?;
        st.torn = false;
        Ok(())
    }
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
}
