//! The home page: the seed's `home.html`, compiled in, with its few placeholders filled and escaped.
//!
//! The template (`templates/home.html`) knows a tiny, fixed vocabulary, mirroring the seed's Jinja:
//!
//! | tag                              | meaning                                                |
//! |----------------------------------|--------------------------------------------------------|
//! | `{{#signed_in}}…{{/signed_in}}`  | kept only for a verified identity                       |
//! | `{{#guest}}…{{/guest}}`          | kept only for guests                                    |
//! | `{{#picture}}…{{/picture}}`      | kept only when the identity has an http(s) picture URL  |
//! | `{{name}}`, `{{picture}}`        | the display name / picture URL, HTML-escaped            |
//!
//! Anything else between `{{` and `}}` is copied through literally. The template is split into
//! pieces once at startup; the guest page is rendered once into [`Bytes`] and shared, and only
//! the signed-in page is rendered per request.

use bytes::Bytes;

use crate::identity::Identity;

const TEMPLATE: &str = include_str!("templates/home.html");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    SignedIn,
    Guest,
    Picture,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    Text(&'static str),
    Name,
    Picture,
    Open(Section),
    Close(Section),
}

/// What one rendering shows: nothing personal for a guest, or a name and an optional picture.
#[derive(Debug, Clone, Copy)]
enum View<'a> {
    Guest,
    SignedIn {
        name: &'a str,
        picture: Option<&'a str>,
    },
}

impl View<'_> {
    fn shows(&self, section: Section) -> bool {
        match (self, section) {
            (View::Guest, Section::Guest) => true,
            (View::SignedIn { .. }, Section::SignedIn) => true,
            (View::SignedIn { picture, .. }, Section::Picture) => picture.is_some(),
            _ => false,
        }
    }
}

/// The compiled home page template plus the pre-rendered guest page.
#[derive(Debug, Clone)]
pub struct HomePage {
    pieces: Vec<Piece>,
    guest: Bytes,
}

impl Default for HomePage {
    fn default() -> Self {
        Self::new()
    }
}

impl HomePage {
    /// Compiles the built-in template and renders the guest page once.
    pub fn new() -> Self {
        let pieces = compile(TEMPLATE);
        let guest = Bytes::from(render(&pieces, View::Guest));
        HomePage { pieces, guest }
    }

    /// The guest page ("Welcome.... Guest!!!" and a Login link); a cheap reference-counted clone.
    pub fn guest(&self) -> Bytes {
        self.guest.clone()
    }

    /// The signed-in page for `identity`: picture (only if http(s)), name, Logout link.
    pub fn signed_in(&self, identity: &Identity) -> Bytes {
        let view = View::SignedIn {
            name: identity.display_name(),
            picture: identity.picture.as_deref().and_then(safe_picture_url),
        };
        Bytes::from(render(&self.pieces, view))
    }
}

/// Splits the template into text and tags. Never fails: unknown tags stay as text.
fn compile(template: &'static str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut text_start = 0; // where the pending literal text begins
    let mut scan = 0; // where to look for the next `{{`
    while let Some(open) = template[scan..].find("{{").map(|i| scan + i) {
        let Some(close) = template[open + 2..].find("}}").map(|i| open + 2 + i) else {
            break;
        };
        scan = open + 2;
        let Some(piece) = tag(&template[open + 2..close]) else {
            continue;
        };
        if open > text_start {
            pieces.push(Piece::Text(&template[text_start..open]));
        }
        pieces.push(piece);
        text_start = close + 2;
        scan = text_start;
    }
    if text_start < template.len() {
        pieces.push(Piece::Text(&template[text_start..]));
    }
    pieces
}

fn tag(name: &str) -> Option<Piece> {
    Some(match name {
        "name" => Piece::Name,
        "picture" => Piece::Picture,
        "#signed_in" => Piece::Open(Section::SignedIn),
        "/signed_in" => Piece::Close(Section::SignedIn),
        "#guest" => Piece::Open(Section::Guest),
        "/guest" => Piece::Close(Section::Guest),
        "#picture" => Piece::Open(Section::Picture),
        "/picture" => Piece::Close(Section::Picture),
        _ => return None,
    })
}

fn render(pieces: &[Piece], view: View<'_>) -> String {
    let capacity = pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) => t.len(),
            _ => 0,
        })
        .sum::<usize>()
        + 256;
    let mut out = String::with_capacity(capacity);
    // The section being skipped, if any; sections of one kind never nest, so a flag is enough.
    let mut skipping: Option<Section> = None;
    for piece in pieces {
        if let Some(section) = skipping {
            if *piece == Piece::Close(section) {
                skipping = None;
            }
            continue;
        }
        match (*piece, view) {
            (Piece::Text(text), _) => out.push_str(text),
            (Piece::Open(section), _) if !view.shows(section) => skipping = Some(section),
            (Piece::Open(_) | Piece::Close(_), _) => {}
            (Piece::Name, View::SignedIn { name, .. }) => escape_into(&mut out, name),
            (
                Piece::Picture,
                View::SignedIn {
                    picture: Some(url), ..
                },
            ) => escape_into(&mut out, url),
            (Piece::Name | Piece::Picture, _) => {}
        }
    }
    out
}

/// Appends `text` to `out` with `& < > " '` replaced by character references, safe in element
/// content and in quoted attribute values.
pub fn escape_into(out: &mut String, text: &str) {
    let mut last = 0;
    for (i, byte) in text.bytes().enumerate() {
        let entity = match byte {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            b'\'' => "&#x27;",
            _ => continue,
        };
        out.push_str(&text[last..i]);
        out.push_str(entity);
        last = i + 1;
    }
    out.push_str(&text[last..]);
}

/// [`escape_into`] a fresh `String`.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    escape_into(&mut out, text);
    out
}

/// `url` if it is an absolute `http://` or `https://` URL without whitespace or control
/// characters, or an inline `data:image/…` picture; `None` for anything else (`javascript:`,
/// other `data:` types, relative paths, …).
pub fn safe_picture_url(url: &str) -> Option<&str> {
    let lower_prefix = |prefix: &str| {
        url.len() > prefix.len()
            && url.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    };
    // Inline raster/SVG images are safe in an <img> (no script runs there); the development
    // identity provider uses one so the offline stack shows a picture.
    let inline_image = [
        "data:image/png",
        "data:image/jpeg",
        "data:image/gif",
        "data:image/webp",
        "data:image/svg+xml",
    ]
    .iter()
    .any(|p| lower_prefix(p));
    let has_scheme = lower_prefix("https://") || lower_prefix("http://") || inline_image;
    let clean = !url.chars().any(|c| c.is_whitespace() || c.is_control());
    (has_scheme && clean).then_some(url)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn page_text(bytes: Bytes) -> String {
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn identity(name: Option<&str>, picture: Option<&str>) -> Identity {
        Identity {
            sub: "auth0|42".into(),
            email: Some("ada@example.com".into()),
            name: name.map(Into::into),
            picture: picture.map(Into::into),
        }
    }

    #[test]
    fn escapes_the_five_html_specials() {
        assert_eq!(
            escape_html(r#"<a href="x">Tom & 'Jerry'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#x27;Jerry&#x27;&lt;/a&gt;"
        );
        assert_eq!(escape_html("plain ünïcode"), "plain ünïcode");
        assert_eq!(escape_html(""), "");
    }

    #[test]
    fn template_has_no_leftover_tags_in_either_view() {
        let page = HomePage::new();
        for text in [
            page_text(page.guest()),
            page_text(page.signed_in(&identity(Some("A"), Some("https://x/y.png")))),
        ] {
            assert!(!text.contains("{{") && !text.contains("}}"), "{text}");
            assert!(text.starts_with("<!DOCTYPE html>"), "{text}");
            assert!(text.contains(r#"<div id="toast">Logged in successfully!</div>"#));
            assert!(text.contains("function showLoader()"));
            assert!(text.contains("img.profile-pic {"));
            assert!(text.trim_end().ends_with("</html>"));
        }
    }

    #[test]
    fn guest_page_offers_login_and_nothing_personal() {
        let text = page_text(HomePage::new().guest());
        assert!(text.contains("<h1>Welcome.... Guest!!!</h1>"), "{text}");
        assert!(text.contains(r#"<a href="/login" onclick="showLoader()">Login</a>"#));
        assert!(text.contains(r#"<div id="loader">Redirecting to login...</div>"#));
        assert!(!text.contains("/logout"));
        assert!(!text.contains("<img"));
        assert!(!text.contains("Welcome to this space"));
    }

    #[test]
    fn signed_in_page_greets_by_name_with_picture_and_logout() {
        let text = page_text(HomePage::new().signed_in(&identity(
            Some("Ada Lovelace"),
            Some("https://cdn.example/ada.png?s=1&t=2"),
        )));
        assert!(
            text.contains("<h1>Welcome to this space... Ada Lovelace!</h1>"),
            "{text}"
        );
        assert!(text.contains(r#"<img src="https://cdn.example/ada.png?s=1&amp;t=2" alt="Profile Picture" class="profile-pic" />"#), "{text}");
        assert!(text.contains(r#"<a href="/logout">Logout</a>"#));
        assert!(!text.contains("Guest!!!"));
        assert!(!text.contains("/login"));
        assert!(!text.contains(r#"id="loader""#));
    }

    #[test]
    fn script_in_name_is_escaped() {
        let text = page_text(
            HomePage::new().signed_in(&identity(Some("<script>alert('x')</script>"), None)),
        );
        assert!(!text.contains("<script>alert"), "{text}");
        assert!(
            text.contains(
                "Welcome to this space... &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;!"
            ),
            "{text}"
        );
    }

    #[test]
    fn picture_is_omitted_unless_http_or_inline_image_and_breakouts_are_escaped() {
        let page = HomePage::new();
        for bad in [
            "javascript:alert(1)",
            "data:text/html,<script>alert(1)</script>",
            "data:image/",
            "/relative.png",
            "https://",
            "https://a b",
            "ftp://x/y",
        ] {
            let text = page_text(page.signed_in(&identity(Some("A"), Some(bad))));
            assert!(!text.contains("<img"), "{bad}: {text}");
        }
        let text = page_text(page.signed_in(&identity(Some("A"), None)));
        assert!(!text.contains("<img"));
        let inline =
            page_text(page.signed_in(&identity(Some("A"), Some("data:image/png;base64,AAAA"))));
        assert!(
            inline.contains("<img src=\"data:image/png;base64,AAAA\""),
            "{inline}"
        );
        let text = page_text(page.signed_in(&identity(
            Some("A"),
            Some(r#"HTTPS://x/"onerror="alert(1)"#),
        )));
        assert!(
            text.contains(r#"<img src="HTTPS://x/&quot;onerror=&quot;alert(1)" "#),
            "{text}"
        );
    }

    #[test]
    fn name_falls_back_to_email_then_sub() {
        let page = HomePage::new();
        let text = page_text(page.signed_in(&identity(None, None)));
        assert!(
            text.contains("Welcome to this space... ada@example.com!"),
            "{text}"
        );
        let sub_only = Identity {
            sub: "auth0|42".into(),
            ..Identity::default()
        };
        let text = page_text(page.signed_in(&sub_only));
        assert!(
            text.contains("Welcome to this space... auth0|42!"),
            "{text}"
        );
    }

    #[test]
    fn unknown_tags_pass_through_and_sections_nest() {
        let pieces = compile("a{{x}}b{{#guest}}G{{/guest}}{{#signed_in}}S{{#picture}}[{{picture}}]{{/picture}}{{name}}{{/signed_in}}{{");
        assert_eq!(render(&pieces, View::Guest), "a{{x}}bG{{");
        assert_eq!(
            render(
                &pieces,
                View::SignedIn {
                    name: "n",
                    picture: None
                }
            ),
            "a{{x}}bSn{{"
        );
        assert_eq!(
            render(
                &pieces,
                View::SignedIn {
                    name: "n",
                    picture: Some("p")
                }
            ),
            "a{{x}}bS[p]n{{"
        );
    }
}
