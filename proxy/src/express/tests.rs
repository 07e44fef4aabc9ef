use super::response::Framing;
use super::Body;

fn frame_all(framing: Framing, pieces: &[&[u8]], close_at_end: bool) -> (String, bool, bool) {
    let mut body = Body::new(framing);
    let mut out = Vec::new();
    let mut result = (false, false);
    for piece in pieces {
        result = body.frame(piece, &mut out).unwrap();
        if result.0 {
            break;
        }
    }
    if close_at_end && !result.0 {
        body.closed();
        result = body.frame(b"", &mut out).unwrap();
    }
    (String::from_utf8(out).unwrap(), result.0, result.1)
}

#[test]
fn a_sized_body_ends_at_its_length_and_notices_extra_bytes() {
    assert_eq!(
        frame_all(Framing::Length(5), &[b"he", b"llo"], false),
        ("hello".into(), true, false)
    );
    assert_eq!(
        frame_all(Framing::Length(2), &[b"hello"], false),
        ("he".into(), true, true)
    );
    assert_eq!(
        frame_all(Framing::Length(0), &[b""], false),
        ("".into(), true, false)
    );
}

#[test]
fn a_chunked_body_is_relayed_unchanged_to_its_last_chunk() {
    let (out, done, extra) = frame_all(Framing::Chunked, &[b"3\r\nab", b"c\r\n0\r\n\r\n"], false);
    assert_eq!(
        (out.as_str(), done, extra),
        ("3\r\nabc\r\n0\r\n\r\n", true, false)
    );
}

#[test]
fn a_body_until_close_reaches_the_client_chunked() {
    let (out, done, _) = frame_all(Framing::UntilClose, &[b"hello", b"!"], true);
    assert_eq!(out, "5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n");
    assert!(done);
}

#[test]
fn no_body_means_done_at_once() {
    assert_eq!(
        frame_all(Framing::Empty, &[b""], false),
        ("".into(), true, false)
    );
}

/// Found by a flaky-test audit: a connection accepted in the listeners' last instant was
/// closed unanswered when shutdown began before its first request's bytes were in.
#[tokio::test]
async fn a_first_request_on_its_way_when_shutdown_begins_is_still_read() {
    use tokio::io::AsyncWriteExt;
    let shutdown = crate::limits::ShutdownSignal::new();
    shutdown.announce();
    let (mut stream, mut client) = crate::limits::connection::client_connection().await;
    let send = async {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        client
            .write_all(b"GET /late HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
    };
    let (read, ()) = tokio::join!(super::read_head(&mut stream, &shutdown), send);
    assert!(read.is_ok(), "the request that was on its way is read");

    // One that brings nothing is closed after that moment.
    let (mut stream, _client) = crate::limits::connection::client_connection().await;
    assert!(matches!(
        super::read_head(&mut stream, &shutdown).await,
        Err(super::Unread::Closed)
    ));
}
