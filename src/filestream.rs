//! Owns reading a recording for upload: exactly `size` bytes, as a stream of chunks, in bounded
//! memory.
//!
//! A recording that was just written is nearly always in the page cache, and copying it from there
//! takes microseconds; handing every chunk to a blocking thread (as `tokio::fs` does) cost more in
//! thread wake-ups than the copy itself (measured with callferry-bench). So each chunk is
//! first read on the runtime's thread with `preadv2(RWF_NOWAIT)`, which the kernel answers only
//! from the page cache and refuses with `EAGAIN` instead of waiting for the disk; only then does the
//! chunk go to the blocking pool. Filesystems without `RWF_NOWAIT` get the blocking pool for every
//! chunk, as before.
//!
//! The cached reads reuse their buffers: a chunk is lent out as `Bytes` and its allocation is
//! taken back once the HTTP client has sent and dropped it. A fresh 256 KiB allocation per chunk
//! was served by glibc from the top of the heap and trimmed back to the kernel on free, so every
//! chunk page-faulted its 64 pages in again: 223,000 minor faults per GiB uploaded, and a third of
//! the daemon's CPU on a large upload (callferry-bench scenario 8). The buffers outlive
//! their upload in a small process-wide pool, so a 1 MiB recording does not fault in a fresh
//! buffer either.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::task::JoinHandle;

/// Streams bytes `0..size` of a file. Fails if the file turns out shorter than `size`; bytes past
/// `size` (a recorder appending to the file since it was queued) are never sent. Fails at the end
/// if the file was written to while it was read (its mtime moved): what was sent may then mix two
/// versions, and the error stops the body before the multipart's closing boundary, so the service
/// never stores it. The new version is queued on its own (found by the adversary: an in-place
/// rewrite between the worker's identity check and its last read stored the new bytes under the
/// old version, and then again under the new one).
pub struct FileChunks {
    file: Arc<File>,
    offset: u64,
    size: u64,
    chunk: usize,
    /// False once the filesystem refused `RWF_NOWAIT`: every chunk then goes to the blocking pool.
    nowait: bool,
    /// A read on the blocking pool: the chunk, and the buffer it was split from.
    pending: Option<JoinHandle<(io::Result<Bytes>, BytesMut)>>,
    /// Buffers whose chunk may still be in the client's hands; one whose chunk was dropped is
    /// reused for the next read.
    spare: Vec<BytesMut>,
    /// Where the spare buffers go when the upload ends, and where new ones come from.
    pool: &'static Pool,
    /// Buffers this stream took from the pool or allocated (not those it reused itself), and of
    /// those the ones allocated (for the tests of their reuse).
    taken: usize,
    allocated: usize,
    /// The mtime of the version being sent: the one the caller checked ([`FileChunks::of_version`]),
    /// else the file's when the stream was made (None: `fstat` failed; then not compared).
    version_mtime: Option<i64>,
    /// The file was compared with its version before the first read.
    started: bool,
    /// The end was reached and checked.
    done: bool,
}

fn mtime_ns(file: &File) -> Option<i64> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().ok()?;
    Some(m.mtime() * 1_000_000_000 + m.mtime_nsec())
}

/// The client holds at most a chunk or two while the next is read (hyper's write queue is
/// bounded); more spare buffers than this would only be memory held for nothing.
const SPARE_BUFFERS: usize = 4;

/// Buffers kept between uploads: 8 x 256 KiB at most, about what 4 workers have in flight anyway.
const POOL_BUFFERS: usize = 8;

/// Spare buffers of finished uploads. One whose chunk is still held somewhere is skipped until it
/// is dropped (`try_reclaim` knows).
pub(crate) struct Pool(std::sync::Mutex<Vec<BytesMut>>);

impl Pool {
    pub(crate) const fn new() -> Pool {
        Pool(std::sync::Mutex::new(Vec::new()))
    }

    fn take(&self, len: usize) -> Option<BytesMut> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let i = v.iter_mut().position(|b| b.try_reclaim(len))?;
        Some(v.swap_remove(i))
    }

    fn give(&self, bufs: &mut Vec<BytesMut>) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let room = POOL_BUFFERS.saturating_sub(v.len());
        v.extend(bufs.drain(..).take(room));
    }
}

static POOL: Pool = Pool::new();

impl Drop for FileChunks {
    fn drop(&mut self) {
        self.pool.give(&mut self.spare);
    }
}

impl FileChunks {
    pub fn new(file: File, size: u64, chunk: usize) -> FileChunks {
        FileChunks {
            offset: 0,
            size,
            chunk: chunk.max(1),
            nowait: true,
            pending: None,
            spare: Vec::new(),
            pool: &POOL,
            taken: 0,
            allocated: 0,
            version_mtime: mtime_ns(&file),
            started: false,
            done: false,
            file: Arc::new(file),
        }
    }

    /// Sends the version whose mtime is `mtime_ns` (the one the caller checked when it opened the
    /// file), and nothing else: a file written to after that check, before the first read (while
    /// the worker declared its interaction, a round trip and a flush), fails before a byte is
    /// sent, and one written to while it is read fails at the end. (Compared with the mtime the
    /// file had when the stream was made, a rewrite during the declare went unseen: the new bytes
    /// were stored under the old version's interaction, and again under their own. The adversary
    /// found it.)
    pub fn of_version(mut self, mtime_ns: i64) -> FileChunks {
        self.version_mtime = Some(mtime_ns);
        self
    }

    /// Whether the file is no longer the version being sent.
    fn changed(&self) -> bool {
        matches!((self.version_mtime, mtime_ns(&self.file)), (Some(v), Some(now)) if v != now)
    }

    /// At the end: the bytes sent are one version only if nothing wrote to the file meanwhile.
    fn finish(&mut self) -> Poll<Option<io::Result<Bytes>>> {
        if self.done {
            return Poll::Ready(None);
        }
        self.done = true;
        if self.changed() {
            return Poll::Ready(Some(Err(io::Error::other(
                "the file was written to while it was being uploaded (its modification time \
                 changed): this upload is abandoned, and the file's new version is queued on its own",
            ))));
        }
        Poll::Ready(None)
    }

    #[cfg(test)]
    fn with_pool(mut self, pool: &'static Pool) -> FileChunks {
        self.pool = pool;
        self
    }

    /// An empty buffer with room for `len` bytes: a spare one whose last chunk has been dropped,
    /// one from the pool, or a new one.
    fn buffer(&mut self, len: usize) -> BytesMut {
        if let Some(i) = self.spare.iter_mut().position(|b| b.try_reclaim(len)) {
            return self.spare.swap_remove(i);
        }
        self.taken += 1;
        self.pool.take(len).unwrap_or_else(|| {
            self.allocated += 1;
            BytesMut::with_capacity(len)
        })
    }

    /// Keeps `buf` (whose bytes were split off and lent out) for a later read.
    fn keep(&mut self, buf: BytesMut) {
        if self.spare.len() < SPARE_BUFFERS {
            self.spare.push(buf);
        }
    }

    #[cfg(test)]
    fn without_nowait(mut self) -> FileChunks {
        self.nowait = false;
        self
    }

    fn next_len(&self) -> usize {
        (self.size - self.offset).min(self.chunk as u64) as usize
    }

    fn advance(&mut self, data: Bytes) -> Poll<Option<io::Result<Bytes>>> {
        if data.is_empty() {
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the file ends after {} bytes, but {} were queued (truncated since?)",
                    self.offset, self.size
                ),
            ))));
        }
        self.offset += data.len() as u64;
        Poll::Ready(Some(Ok(data)))
    }
}

/// One `preadv2(RWF_NOWAIT)` into `buf` (empty, with room for `len`): the bytes the page cache had
/// (possibly fewer than asked, when only part of the range is cached), split off `buf`, or None
/// when it had none: the range is not cached, or it is past the end of the file (the blocking read
/// then tells which).
fn read_cached(
    file: &File,
    buf: &mut BytesMut,
    len: usize,
    offset: u64,
) -> io::Result<Option<Bytes>> {
    let spare = buf.spare_capacity_mut();
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: len.min(spare.len()),
    };
    // SAFETY: the iovec points into `buf`'s spare capacity, which outlives the call; the kernel
    // writes at most `iov_len` bytes there, and only those it reports are marked initialised.
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(n as usize) };
    Ok((n > 0).then(|| buf.split().freeze()))
}

impl Stream for FileChunks {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            if let Some(task) = &mut this.pending {
                let r = ready!(Pin::new(task).poll(cx));
                this.pending = None;
                let r = r.map(|(read, buf)| {
                    this.keep(buf);
                    read
                });
                return match r {
                    Ok(Ok(data)) => this.advance(data),
                    Ok(Err(e)) => Poll::Ready(Some(Err(e))),
                    Err(e) => Poll::Ready(Some(Err(io::Error::other(format!(
                        "file read task failed: {e}"
                    ))))),
                };
            }
            if !this.started {
                this.started = true;
                if this.changed() {
                    this.done = true;
                    return Poll::Ready(Some(Err(io::Error::other(
                        "the file was written to after it was checked for upload (its \
                         modification time changed): this upload is abandoned before sending, and \
                         the file's new version is queued on its own",
                    ))));
                }
            }
            if this.offset >= this.size {
                return this.finish();
            }
            let len = this.next_len();
            if this.nowait {
                let mut buf = this.buffer(len);
                let read = read_cached(&this.file, &mut buf, len, this.offset);
                this.keep(buf);
                match read {
                    Ok(Some(data)) => return this.advance(data),
                    Ok(None) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                        this.nowait = false;
                    }
                    Err(e) => return Poll::Ready(Some(Err(e))),
                }
            }
            let (file, offset) = (this.file.clone(), this.offset);
            let mut buf = this.buffer(len);
            // Polled at the top of the loop, which registers this task's waker with it.
            this.pending = Some(tokio::task::spawn_blocking(move || {
                buf.resize(len, 0);
                let read = file.read_at(&mut buf, offset).map(|n| {
                    buf.truncate(n);
                    buf.split().freeze()
                });
                (read, buf)
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::io::Write;

    fn sample(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        (f, data)
    }

    async fn collect(s: FileChunks) -> io::Result<(Vec<u8>, usize)> {
        let mut out = Vec::new();
        let mut chunks = 0;
        let mut s = std::pin::pin!(s);
        while let Some(c) = s.next().await {
            let c = c?;
            assert!(!c.is_empty());
            out.extend_from_slice(&c);
            chunks += 1;
        }
        Ok((out, chunks))
    }

    #[tokio::test]
    async fn streams_exactly_the_queued_bytes_from_the_page_cache_and_from_the_pool() {
        let (f, data) = sample(100_000);
        for nowait in [true, false] {
            let mut s = FileChunks::new(File::open(f.path()).unwrap(), 100_000, 4096);
            if !nowait {
                s = s.without_nowait();
            }
            let (got, chunks) = collect(s).await.unwrap();
            assert_eq!(got, data, "nowait {nowait}");
            assert_eq!(chunks, 100_000usize.div_ceil(4096));
        }
    }

    /// A chunk's buffer is reused once the client has dropped the chunk, and never while it holds
    /// it: the bytes a client still holds are never overwritten.
    #[tokio::test]
    async fn buffers_are_reused_only_after_their_chunk_was_dropped() {
        let (f, data) = sample(100_000);
        for nowait in [true, false] {
            let mut s = FileChunks::new(File::open(f.path()).unwrap(), 100_000, 4096);
            if !nowait {
                s = s.without_nowait();
            }
            let mut out = Vec::new();
            while let Some(c) = s.next().await {
                out.extend_from_slice(&c.unwrap());
            }
            assert_eq!(out, data, "nowait {nowait}");
            assert_eq!(
                s.taken, 1,
                "nowait {nowait}: one buffer for every chunk dropped before the next read"
            );
        }
        let mut s = FileChunks::new(File::open(f.path()).unwrap(), 100_000, 4096);
        let mut held = Vec::new();
        while let Some(c) = s.next().await {
            held.push(c.unwrap());
        }
        let chunks = 100_000usize.div_ceil(4096);
        assert_eq!(s.taken, chunks, "a held chunk's buffer is never reused");
        assert_eq!(held.concat(), data, "and its bytes are never overwritten");
        // Two in the client's hands at a time, as hyper's write queue holds them.
        let mut s = FileChunks::new(File::open(f.path()).unwrap(), 100_000, 4096);
        let mut window = std::collections::VecDeque::new();
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            window.push_back(c.unwrap());
            if window.len() > 2 {
                out.extend_from_slice(&window.pop_front().unwrap());
            }
        }
        out.extend(window.into_iter().flatten());
        assert_eq!(out, data);
        assert_eq!(s.taken, 3);
    }

    /// The next upload takes its buffers from the ones the last one left, unless a chunk of
    /// theirs is still held.
    #[tokio::test]
    async fn the_next_upload_reuses_the_last_ones_buffers() {
        static POOL: Pool = Pool::new();
        let (f, data) = sample(100_000);
        let stream =
            || FileChunks::new(File::open(f.path()).unwrap(), 100_000, 4096).with_pool(&POOL);
        let mut s = stream();
        let chunks = 100_000usize.div_ceil(4096);
        let mut held = None;
        for i in 0..chunks {
            let c = s.next().await.unwrap().unwrap();
            if i == chunks - 1 {
                held = Some(c);
            }
        }
        assert!(s.next().await.is_none());
        assert_eq!(s.allocated, 1);
        drop(s);
        // Its one buffer is in the pool, but its last chunk is still held.
        let mut s = stream();
        assert!(s.next().await.is_some());
        assert_eq!(s.allocated, 1, "a buffer whose chunk is held is not taken");
        drop(s);
        drop(held);
        let (got, _) = collect(stream()).await.unwrap();
        assert_eq!(got, data);
        let mut s = stream();
        while let Some(c) = s.next().await {
            c.unwrap();
        }
        assert_eq!((s.taken, s.allocated), (1, 0), "taken from the pool");
    }

    #[tokio::test]
    async fn bytes_appended_after_queueing_are_not_sent() {
        let (f, data) = sample(10_000);
        let s = FileChunks::new(File::open(f.path()).unwrap(), 6_000, 4096);
        let (got, _) = collect(s).await.unwrap();
        assert_eq!(got, &data[..6_000]);
    }

    #[tokio::test]
    async fn a_file_shorter_than_queued_is_an_error_not_a_short_upload() {
        let (f, _) = sample(5_000);
        for nowait in [true, false] {
            let mut s = FileChunks::new(File::open(f.path()).unwrap(), 8_000, 4096);
            if !nowait {
                s = s.without_nowait();
            }
            let e = collect(s).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
            assert!(e.to_string().contains("5000"), "{e}");
        }
    }

    #[tokio::test]
    async fn a_file_written_to_while_it_is_read_fails_at_the_end() {
        for nowait in [true, false] {
            let (f, _) = sample(20_000);
            let mut s = FileChunks::new(File::open(f.path()).unwrap(), 20_000, 4096);
            if !nowait {
                s = s.without_nowait();
            }
            let mut s = std::pin::pin!(s);
            let first = s.next().await.unwrap().unwrap();
            assert_eq!(first.len(), 4096);
            // Rewritten in place, same size, with a modification time of its own (an explicit
            // one: a write within the same clock tick could keep the old time).
            let w = std::fs::OpenOptions::new()
                .write(true)
                .open(f.path())
                .unwrap();
            w.write_all_at(&[0xAA; 20_000], 0).unwrap();
            w.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(7))
                .unwrap();
            let mut last = None;
            while let Some(c) = s.next().await {
                last = Some(c);
            }
            let e = last.unwrap().unwrap_err();
            assert!(
                e.to_string().contains("written to while"),
                "nowait {nowait}: {e}"
            );
        }
    }

    /// A file rewritten after the worker checked it (during the declare) and before the stream
    /// was made sends nothing: the stream compares with the version checked, not with what the
    /// file holds when the stream is made. The version itself streams whole.
    #[tokio::test]
    async fn a_file_rewritten_after_its_check_sends_nothing() {
        use std::os::unix::fs::MetadataExt;
        let (f, data) = sample(20_000);
        let checked = {
            let m = std::fs::metadata(f.path()).unwrap();
            m.mtime() * 1_000_000_000 + m.mtime_nsec()
        };
        let (got, _) = collect(
            FileChunks::new(File::open(f.path()).unwrap(), 20_000, 4096).of_version(checked),
        )
        .await
        .unwrap();
        assert_eq!(got, data, "the checked version streams whole");
        // Rewritten in place, same size, new modification time, before the upload starts.
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(f.path())
            .unwrap();
        w.write_all_at(&[0xAA; 20_000], 0).unwrap();
        w.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(7))
            .unwrap();
        let s = FileChunks::new(File::open(f.path()).unwrap(), 20_000, 4096).of_version(checked);
        let mut s = std::pin::pin!(s);
        let e = s.next().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("after it was checked"), "{e}");
        assert!(s.next().await.is_none(), "nothing after the error");
    }

    #[tokio::test]
    async fn an_empty_range_ends_at_once() {
        let (f, _) = sample(10);
        let (got, chunks) = collect(FileChunks::new(File::open(f.path()).unwrap(), 0, 4096))
            .await
            .unwrap();
        assert!(got.is_empty());
        assert_eq!(chunks, 0);
    }
}
