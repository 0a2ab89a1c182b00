//! Owns reading a recording for upload: exactly `size` bytes, as a stream of chunks, in bounded
//! memory.
//!
//! A recording that was just written is nearly always in the page cache, and copying it from there
//! takes microseconds; handing every chunk to a blocking thread (as `tokio::fs` does) cost more in
//! thread wake-ups than the copy itself (measured with callferry-bench, issue 8). So each chunk is
//! first read on the runtime's thread with `preadv2(RWF_NOWAIT)`, which the kernel answers only
//! from the page cache and refuses with `EAGAIN` instead of waiting for the disk; only then does the
//! chunk go to the blocking pool. Filesystems without `RWF_NOWAIT` get the blocking pool for every
//! chunk, as before.

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
/// `size` (a recorder appending to the file since it was queued) are never sent.
pub struct FileChunks {
    file: Arc<File>,
    offset: u64,
    size: u64,
    chunk: usize,
    /// False once the filesystem refused `RWF_NOWAIT`: every chunk then goes to the blocking pool.
    nowait: bool,
    pending: Option<JoinHandle<io::Result<Bytes>>>,
}

impl FileChunks {
    pub fn new(file: File, size: u64, chunk: usize) -> FileChunks {
        FileChunks {
            file: Arc::new(file),
            offset: 0,
            size,
            chunk: chunk.max(1),
            nowait: true,
            pending: None,
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

/// One `preadv2(RWF_NOWAIT)`: the bytes the page cache had (possibly fewer than asked, when only
/// part of the range is cached), or None when it had none: the range is not cached, or it is past
/// the end of the file (the blocking read then tells which).
fn read_cached(file: &File, len: usize, offset: u64) -> io::Result<Option<Bytes>> {
    let mut buf = BytesMut::with_capacity(len);
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
    Ok((n > 0).then(|| buf.freeze()))
}

impl Stream for FileChunks {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(task) = &mut this.pending {
                let r = ready!(Pin::new(task).poll(cx));
                this.pending = None;
                return match r {
                    Ok(Ok(data)) => this.advance(data),
                    Ok(Err(e)) => Poll::Ready(Some(Err(e))),
                    Err(e) => Poll::Ready(Some(Err(io::Error::other(format!(
                        "file read task failed: {e}"
                    ))))),
                };
            }
            if this.offset >= this.size {
                return Poll::Ready(None);
            }
            let len = this.next_len();
            if this.nowait {
                match read_cached(&this.file, len, this.offset) {
                    Ok(Some(data)) => return this.advance(data),
                    Ok(None) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                        this.nowait = false;
                    }
                    Err(e) => return Poll::Ready(Some(Err(e))),
                }
            }
            let (file, offset) = (this.file.clone(), this.offset);
            // Polled at the top of the loop, which registers this task's waker with it.
            this.pending = Some(tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                let n = file.read_at(&mut buf, offset)?;
                buf.truncate(n);
                Ok(Bytes::from(buf))
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
    async fn an_empty_range_ends_at_once() {
        let (f, _) = sample(10);
        let (got, chunks) = collect(FileChunks::new(File::open(f.path()).unwrap(), 0, 4096))
            .await
            .unwrap();
        assert!(got.is_empty());
        assert_eq!(chunks, 0);
    }
}
