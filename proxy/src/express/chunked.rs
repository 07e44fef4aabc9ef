//! Where a chunked body ends (RFC 9112 §7.1), so the fast path can relay a worker's chunked
//! answer unchanged and still know when the upstream connection is free again.

/// A chunked body that does not follow the grammar: the connection cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// Longest chunk-size line (size and extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size (`digits` counts them).
    Size,
    /// `;ext` after the size, up to CR.
    Extension,
    /// LF after a size line.
    SizeLf,
    /// `remaining` bytes of chunk data.
    Data,
    /// CR, then LF, after chunk data.
    DataCr,
    DataLf,
    /// The start of a trailer line, or the final CRLF.
    TrailerStart,
    /// A trailer field's name, up to its colon.
    TrailerName,
    /// A trailer field's value, up to CR.
    TrailerValue,
    TrailerLf,
    /// LF of the final CRLF.
    FinalLf,
    Done,
}

/// Follows a chunked body through the bytes fed to it.
#[derive(Debug)]
pub struct ChunkedEnd {
    state: State,
    remaining: u64,
    digits: u32,
    line: usize,
    /// Chunk data bytes seen so far (the body without its framing).
    data: u64,
}

impl Default for ChunkedEnd {
    fn default() -> Self {
        ChunkedEnd {
            state: State::Size,
            remaining: 0,
            digits: 0,
            line: 0,
            data: 0,
        }
    }
}

impl ChunkedEnd {
    /// Feed the next bytes of the body: `Some(n)` when the body ends after the first `n` of
    /// them (what follows is not part of it), `None` when it goes on.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, Malformed> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.state {
                State::Data => {
                    let available = (bytes.len() - i) as u64;
                    let take = available.min(self.remaining);
                    self.remaining -= take;
                    self.data += take;
                    // `take` ≤ the bytes left in the slice: it fits a usize.
                    i += take as usize;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::Size => match hex_value(b) {
                    Some(v) => {
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err(Malformed);
                        }
                        self.remaining = self.remaining * 16 + u64::from(v);
                    }
                    None if self.digits == 0 => return Err(Malformed),
                    None if b == b';' || b == b' ' || b == b'\t' => self.state = State::Extension,
                    None if b == b'\r' => self.state = State::SizeLf,
                    None => return Err(Malformed),
                },
                State::Extension => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(Malformed),
                    _ => self.long_line()?,
                },
                State::SizeLf => {
                    expect(b, b'\n')?;
                    self.line = 0;
                    self.digits = 0;
                    self.state = if self.remaining == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::DataCr => {
                    expect(b, b'\r')?;
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    expect(b, b'\n')?;
                    self.state = State::Size;
                }
                State::TrailerStart => match b {
                    b'\r' => self.state = State::FinalLf,
                    _ if is_tchar(b) => {
                        self.line = 1;
                        self.state = State::TrailerName;
                    }
                    // No name, a folded line, a bare LF.
                    _ => return Err(Malformed),
                },
                // A trailer line is a header field line (RFC 9112 §7.1.2): the client parses
                // it as one, so the proxy passes on only what a header would be.
                State::TrailerName => match b {
                    b':' => {
                        self.long_line()?;
                        self.state = State::TrailerValue;
                    }
                    _ if is_tchar(b) => self.long_line()?,
                    _ => return Err(Malformed),
                },
                State::TrailerValue => match b {
                    b'\r' => self.state = State::TrailerLf,
                    b'\t' | b' '..=b'~' | 0x80..=0xff => self.long_line()?,
                    // NUL, a bare LF, other controls.
                    _ => return Err(Malformed),
                },
                State::TrailerLf => {
                    expect(b, b'\n')?;
                    self.line = 0;
                    self.state = State::TrailerStart;
                }
                State::FinalLf => {
                    expect(b, b'\n')?;
                    self.state = State::Done;
                    return Ok(Some(i + 1));
                }
                State::Done => return Ok(Some(i)),
            }
            i += 1;
        }
        Ok((self.state == State::Done).then_some(i))
    }

    /// The body's bytes fed so far, without chunk sizes, extensions, line ends or trailers:
    /// what the metrics and the access log count, as Pingora's path counts them.
    pub fn data_bytes(&self) -> u64 {
        self.data
    }

    fn long_line(&mut self) -> Result<(), Malformed> {
        self.line += 1;
        if self.line > MAX_LINE {
            return Err(Malformed);
        }
        Ok(())
    }
}

fn expect(got: u8, want: u8) -> Result<(), Malformed> {
    if got == want {
        Ok(())
    } else {
        Err(Malformed)
    }
}

/// A byte of a field name (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] =
        b"5\r\nhello\r\n1a;name=v\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\n";

    #[test]
    fn only_chunk_data_counts_as_body_bytes() {
        let mut tracker = ChunkedEnd::default();
        for piece in BODY.chunks(3) {
            let _ = tracker.feed(piece);
        }
        assert_eq!(tracker.data_bytes(), 5 + 26);
    }

    #[test]
    fn finds_the_end_of_a_body_fed_whole_or_byte_by_byte() {
        let mut whole = ChunkedEnd::default();
        assert_eq!(whole.feed(BODY), Ok(Some(BODY.len())));

        let mut bytewise = ChunkedEnd::default();
        for (i, b) in BODY.iter().enumerate() {
            let end = bytewise.feed(std::slice::from_ref(b)).unwrap();
            assert_eq!(end.is_some(), i == BODY.len() - 1, "byte {i}");
        }
    }

    #[test]
    fn relays_trailer_fields_with_any_visible_value() {
        let body =
            b"0\r\nx-checksum: sha-256=:abc/+=:\r\nserver-timing: db;dur=53, \xc3\xa9\r\n\r\n";
        assert_eq!(ChunkedEnd::default().feed(body), Ok(Some(body.len())));
    }

    #[test]
    fn stops_at_the_end_and_leaves_what_follows() {
        let mut body = b"3\r\nabc\r\n0\r\n\r\n".to_vec();
        let len = body.len();
        body.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(ChunkedEnd::default().feed(&body), Ok(Some(len)));
    }

    #[test]
    fn data_that_looks_like_the_end_is_data() {
        let body = b"5\r\n0\r\n\r\n\r\n0\r\n\r\n";
        assert_eq!(ChunkedEnd::default().feed(body), Ok(Some(body.len())));
        let mut tracker = ChunkedEnd::default();
        assert_eq!(tracker.feed(&body[..8]), Ok(None));
    }

    #[test]
    fn refuses_what_breaks_the_grammar() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"1234567890abcdef0\r\n",
            b"0\r\nbad\ntrailer",
            // Trailer lines a client would not read as header fields.
            b"0\r\nno colon\r\n\r\n",
            b"0\r\n: empty name\r\n\r\n",
            b"0\r\nx-a: 1\r\n folded\r\n\r\n",
            b"0\r\nx-a: nul\0\r\n\r\n",
            b"0\r\nx-a: cr\rx\r\n\r\n",
            b"0\r\nx a: 1\r\n\r\n",
        ] {
            assert_eq!(ChunkedEnd::default().feed(bad), Err(Malformed), "{bad:?}");
        }
        let long_ext = [b"1;".to_vec(), vec![b'e'; MAX_LINE + 1]].concat();
        assert_eq!(ChunkedEnd::default().feed(&long_ext), Err(Malformed));
    }
}
