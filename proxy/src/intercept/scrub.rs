//! Secrets scrubbed from response bodies: every occurrence of an injected
//! value (or of one of its long tokens, or their base64 forms) in a body
//! that flows back to the sandbox is overwritten with `*`, byte for byte,
//! so `Content-Length` stays true. Occurrences split across chunks are
//! found: a chunk that ends with the beginning of a secret holds those
//! bytes back for the next one; any other chunk passes whole, uncopied.
//!
//! Streams must not stall on that hold-back (a gRPC or SSE stream waits
//! for each message): when the upstream has nothing more for now, the held
//! bytes are sent. If they end with the beginning of a secret, the rest of
//! that secret is still masked when it arrives; only the part sent before
//! the pause went out as it was (an upstream pausing in the middle of
//! echoing a secret: residual risk, documented).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use memchr::memmem::Finder;

/// Finds and masks secrets in a byte stream.
#[derive(Clone, Debug)]
pub struct Scrubber {
    /// Shared by every response of a transform rule (built once).
    finders: Arc<[Finder<'static>]>,
    carry: BytesMut,
    masked: usize,
    /// After a flush: (secret index, bytes of it already sent) for every
    /// secret whose beginning ended the flushed bytes.
    partial: Vec<(usize, usize)>,
}

impl Scrubber {
    /// A scrubber for `secrets` (empty ones are ignored); `None` when there
    /// is nothing to look for.
    pub fn new(secrets: &[Vec<u8>]) -> Option<Self> {
        let finders: Arc<[Finder<'static>]> = secrets
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| Finder::new(s).into_owned())
            .collect();
        if finders.is_empty() {
            return None;
        }
        Some(Self {
            finders,
            carry: BytesMut::new(),
            masked: 0,
            partial: Vec::new(),
        })
    }

    /// Feeds `data`; returns what may be passed on now.
    pub fn push(&mut self, data: &[u8]) -> Bytes {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(data);
        self.mask_continuations(&mut buf);
        self.mask(&mut buf);
        let hold = self.open_end(&buf);
        self.carry = buf.split_off(buf.len() - hold);
        buf.freeze()
    }

    /// Feeds `data` as [`Scrubber::push`] does, without copying it when
    /// nothing is held back and no secret is in it.
    pub fn push_bytes(&mut self, mut data: Bytes) -> Bytes {
        if !self.clean_start(&data) {
            return self.push(&data);
        }
        let hold = self.open_end(&data);
        if hold > 0 {
            let tail = data.split_off(data.len() - hold);
            self.carry.extend_from_slice(&tail);
        }
        data
    }

    /// How many bytes at the end of `buf` begin a secret (the longest end
    /// that is a proper prefix of one): an occurrence the next chunk
    /// completes starts there, so only they wait. Any shorter such end is
    /// inside the longest.
    fn open_end(&self, buf: &[u8]) -> usize {
        let mut hold = 0;
        for f in self.finders.iter() {
            let needle = f.needle();
            let longest = (needle.len() - 1).min(buf.len());
            for k in (hold + 1..=longest).rev() {
                let end = &buf[buf.len() - k..];
                if end[0] == needle[0] && end == &needle[..k] {
                    hold = k;
                    break;
                }
            }
        }
        hold
    }

    /// Feeds the last `data` of the stream: what [`Scrubber::push`] and then
    /// [`Scrubber::finish`] would pass on, at once (and without copying
    /// when nothing is held back and no secret is in it).
    pub fn push_last(&mut self, data: Bytes) -> Bytes {
        if self.clean_start(&data) {
            return data;
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(&data);
        self.mask_continuations(&mut buf);
        self.mask(&mut buf);
        buf.freeze()
    }

    /// Whether `data` contains any of the secrets.
    pub fn finds_any(&self, data: &[u8]) -> bool {
        self.finders.iter().any(|f| f.find(data).is_some())
    }

    /// Whether `data` would pass unchanged: nothing held back, no secret
    /// begun before, none in it.
    fn clean_start(&self, data: &[u8]) -> bool {
        self.carry.is_empty() && self.partial.is_empty() && !self.finds_any(data)
    }

    /// The held-back tail, at the end of the stream.
    pub fn finish(&mut self) -> Bytes {
        let mut buf = std::mem::take(&mut self.carry);
        self.mask(&mut buf);
        buf.freeze()
    }

    /// The held-back bytes, now (the stream paused); remembers which
    /// secrets they may have begun.
    pub fn flush(&mut self) -> Bytes {
        let buf = self.finish();
        self.partial.clear();
        for (i, f) in self.finders.iter().enumerate() {
            let needle = f.needle();
            for k in (1..needle.len()).rev() {
                if buf.len() >= k && buf[buf.len() - k..] == needle[..k] {
                    self.partial.push((i, k));
                }
            }
        }
        buf
    }

    /// Whether bytes are held back.
    pub fn holding(&self) -> bool {
        !self.carry.is_empty()
    }

    /// Masks the rest of a secret that the last flush ended in the middle of.
    fn mask_continuations(&mut self, buf: &mut [u8]) {
        for (i, k) in std::mem::take(&mut self.partial) {
            let rest = &self.finders[i].needle()[k..];
            if buf.len() >= rest.len() && &buf[..rest.len()] == rest {
                buf[..rest.len()].fill(b'*');
                self.masked += 1;
            }
        }
    }

    /// Occurrences masked so far.
    pub fn masked(&self) -> usize {
        self.masked
    }

    fn mask(&mut self, buf: &mut [u8]) {
        for f in self.finders.iter() {
            let n = f.needle().len();
            let mut from = 0;
            while let Some(i) = f.find(&buf[from..]) {
                let at = from + i;
                buf[at..at + n].fill(b'*');
                self.masked += 1;
                from = at + n;
            }
        }
    }
}

/// A response body with secrets masked in its data and redacted from its
/// trailers.
pub struct ScrubBody<B, R> {
    inner: B,
    scrub: Scrubber,
    redact_trailers: R,
    trailers: Option<HeaderMap>,
    done: bool,
}

impl<B, R: Fn(&mut HeaderMap)> ScrubBody<B, R> {
    /// Wraps `inner`; `redact_trailers` is applied to its trailers.
    pub fn new(inner: B, scrub: Scrubber, redact_trailers: R) -> Self {
        Self {
            inner,
            scrub,
            redact_trailers,
            trailers: None,
            done: false,
        }
    }
}

impl<B, R> Body for ScrubBody<B, R>
where
    B: Body<Data = Bytes> + Unpin,
    R: Fn(&mut HeaderMap) + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            if polled.is_pending() && this.scrub.holding() {
                // Nothing more for now: do not stall a stream on the
                // hold-back.
                return Poll::Ready(Some(Ok(Frame::data(this.scrub.flush()))));
            }
            match ready!(polled) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let out = if this.inner.is_end_stream() {
                            // The last frame: nothing to hold back for.
                            this.done = true;
                            this.scrub.push_last(data)
                        } else {
                            this.scrub.push_bytes(data)
                        };
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => {
                        if let Ok(mut t) = frame.into_trailers() {
                            (this.redact_trailers)(&mut t);
                            this.trailers = Some(t);
                        }
                        this.done = true;
                        let tail = this.scrub.finish();
                        if !tail.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(tail))));
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    this.done = true;
                    let tail = this.scrub.finish();
                    if !tail.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none() && self.scrub.carry.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        // Masking keeps every length.
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn run(secrets: &[&str], chunks: &[&str]) -> (String, usize) {
        let secrets: Vec<Vec<u8>> = secrets.iter().map(|s| s.as_bytes().to_vec()).collect();
        let mut s = Scrubber::new(&secrets).unwrap();
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&s.push(c.as_bytes()));
        }
        out.extend_from_slice(&s.finish());
        (String::from_utf8(out).unwrap(), s.masked())
    }

    #[test]
    fn masks_in_place_keeping_the_length() {
        let (out, n) = run(&["sk-secret"], &["{\"auth\": \"Bearer sk-secret\"}"]);
        assert_eq!(out, "{\"auth\": \"Bearer *********\"}");
        assert_eq!(n, 1);
    }

    #[test]
    fn finds_secrets_split_across_chunks_of_any_size() {
        let body = "aa sk-secret bb sk-secret";
        for size in 1..body.len() {
            let chunks: Vec<String> = body
                .as_bytes()
                .chunks(size)
                .map(|c| String::from_utf8(c.to_vec()).unwrap())
                .collect();
            let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
            let (out, n) = run(&["sk-secret"], &refs);
            assert_eq!(out, "aa ********* bb *********", "chunk size {size}");
            assert_eq!(n, 2);
        }
    }

    #[test]
    fn a_flush_mid_secret_still_masks_the_rest() {
        let secrets = vec![b"sk-secret".to_vec()];
        let mut s = Scrubber::new(&secrets).unwrap();
        let mut out = s.push(b"key: sk-se").to_vec();
        assert!(s.holding());
        out.extend_from_slice(&s.flush());
        assert!(!s.holding());
        out.extend_from_slice(&s.push(b"cret; next"));
        out.extend_from_slice(&s.finish());
        assert_eq!(String::from_utf8(out).unwrap(), "key: sk-se****; next");
        // Short messages pass at once when the stream pauses.
        let mut s = Scrubber::new(&secrets).unwrap();
        let mut out = s.push(b"ping").to_vec();
        out.extend_from_slice(&s.flush());
        assert_eq!(out, b"ping");
    }

    #[test]
    fn owned_pushes_pass_the_same_bytes_as_copied_ones() {
        let secrets = vec![b"sk-secret".to_vec(), b"c2stc2VjcmV0".to_vec()];
        let body = "aa sk-secret bb c2stc2VjcmV0 cc sk-secre";
        for size in 1..=body.len() {
            let chunks: Vec<&[u8]> = body.as_bytes().chunks(size).collect();
            let mut copied = Scrubber::new(&secrets).unwrap();
            let mut want = Vec::new();
            for c in &chunks {
                want.extend_from_slice(&copied.push(c));
            }
            want.extend_from_slice(&copied.finish());
            // push_bytes, then finish.
            let mut owned = Scrubber::new(&secrets).unwrap();
            let mut got = Vec::new();
            for c in &chunks {
                got.extend_from_slice(&owned.push_bytes(Bytes::copy_from_slice(c)));
            }
            got.extend_from_slice(&owned.finish());
            assert_eq!(got, want, "chunk size {size}");
            assert_eq!(owned.masked(), copied.masked());
            // push_bytes, the last chunk through push_last.
            let mut owned = Scrubber::new(&secrets).unwrap();
            let mut got = Vec::new();
            let (last, rest) = chunks.split_last().unwrap();
            for c in rest {
                got.extend_from_slice(&owned.push_bytes(Bytes::copy_from_slice(c)));
            }
            got.extend_from_slice(&owned.push_last(Bytes::copy_from_slice(last)));
            assert!(!owned.holding());
            assert_eq!(got, want, "chunk size {size}, last at once");
            assert_eq!(owned.masked(), copied.masked());
        }
        assert_eq!(
            String::from_utf8(
                Scrubber::new(&secrets)
                    .unwrap()
                    .push_last(Bytes::from(body))
                    .to_vec()
            )
            .unwrap(),
            "aa ********* bb ************ cc sk-secre"
        );
    }

    #[test]
    fn only_an_end_that_begins_a_secret_waits() {
        let secrets = vec![b"sk-secret".to_vec(), b"c2stc2VjcmV0".to_vec()];
        let mut s = Scrubber::new(&secrets).unwrap();
        // Ends that begin no secret: each chunk passes whole, uncopied.
        for chunk in [&b"{\"data\": [1, 2, 3], "[..], b"\"more\": \"text\"}\n"] {
            let data = Bytes::copy_from_slice(chunk);
            let out = s.push_bytes(data.clone());
            assert_eq!(out.as_ptr(), data.as_ptr());
            assert_eq!(out, data);
            assert!(!s.holding());
        }
        // "sk-se" may begin "sk-secret", "c2" "c2stc2VjcmV0": only they wait.
        assert_eq!(&s.push_bytes(Bytes::from_static(b"a sk-se"))[..], b"a ");
        assert!(s.holding());
        assert_eq!(
            &s.push_bytes(Bytes::from_static(b"cret, c2"))[..],
            b"*********, "
        );
        assert_eq!(&s.push_bytes(Bytes::from_static(b"x"))[..], b"c2x");
        assert!(!s.holding());
    }

    #[test]
    fn any_chunking_masks_as_the_whole_body_would() {
        let secrets = vec![b"sk-secret".to_vec(), b"c2stc2VjcmV0".to_vec()];
        // Pieces that begin, end and overlap the secrets often.
        let pieces: [&[u8]; 9] = [
            b"sk-",
            b"sk-secret",
            b"s",
            b"k",
            b"c2st",
            b"c2stc2VjcmV0",
            b"x",
            b" ",
            b"sk-secre",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            usize::try_from(seed % n as u64).unwrap()
        };
        for _ in 0..500 {
            let body: Vec<u8> = (0..next(40))
                .flat_map(|_| pieces[next(pieces.len())].to_vec())
                .collect();
            let whole = Scrubber::new(&secrets)
                .unwrap()
                .push_last(Bytes::from(body.clone()));
            let mut s = Scrubber::new(&secrets).unwrap();
            let mut got = Vec::new();
            let mut at = 0;
            while at < body.len() {
                let n = (1 + next(16)).min(body.len() - at);
                let chunk = Bytes::copy_from_slice(&body[at..at + n]);
                got.extend_from_slice(&s.push_bytes(chunk));
                at += n;
            }
            got.extend_from_slice(&s.finish());
            assert_eq!(got, whole, "{}", String::from_utf8_lossy(&body));
        }
    }

    #[test]
    fn a_clean_last_frame_passes_without_a_copy() {
        let secrets = vec![b"sk-secret".to_vec()];
        let mut s = Scrubber::new(&secrets).unwrap();
        let data = Bytes::from_static(b"nothing to see here, nothing at all");
        let out = s.push_last(data.clone());
        assert_eq!(out.as_ptr(), data.as_ptr());
        assert_eq!(out, data);
    }

    #[tokio::test]
    async fn a_body_ends_with_its_last_frame_unsplit() {
        use http_body_util::{BodyExt, Full};
        let secrets = vec![b"sk-secret".to_vec()];
        let scrub = Scrubber::new(&secrets).unwrap();
        let inner = Full::new(Bytes::from_static(b"{\"key\": \"sk-secret\", \"n\": 1}"));
        let mut body = ScrubBody::new(inner, scrub, |_: &mut HeaderMap| {});
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"{\"key\": \"*********\", \"n\": 1}");
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }

    #[test]
    fn leaves_other_bytes_alone() {
        let (out, n) = run(
            &["sk-secret", "c2stc2VjcmV0"],
            &["nothing ", "to see ", "sk-secre"],
        );
        assert_eq!(out, "nothing to see sk-secre");
        assert_eq!(n, 0);
    }
}
