//! The provider's HTML pages (login form, errors, signed out); every interpolated value is escaped.

/// Shown at the top of every page and in the startup banner.
pub(crate) const NOT_FOR_PRODUCTION: &str = "Development identity provider — not for production";

/// Escapes text for HTML element content and quoted attribute values (the proxy's escaper).
pub(crate) use custodia_proxy::pages::escape_html as escape;

/// What the login form shows; all fields are raw text, escaped when rendered.
pub(crate) struct LoginForm<'a> {
    /// Where the form posts (the `/authorize` endpoint).
    pub action: &'a str,
    /// The server-side pending-request id carried in a hidden field.
    pub request_id: &'a str,
    /// The client the user is signing in to.
    pub client_id: &'a str,
    /// The demo account's credentials, printed on the form.
    pub demo_username: &'a str,
    pub demo_password: &'a str,
    /// The username typed last time, kept after a failed attempt.
    pub username: &'a str,
    /// Message after a failed attempt.
    pub error: Option<&'a str>,
}

/// The login form with the demo credentials on it, and Sign in / Cancel buttons.
pub(crate) fn login_page(form: &LoginForm<'_>) -> String {
    let error = form
        .error
        .map(|message| format!(r#"<p class="error" role="alert">{}</p>"#, escape(message)))
        .unwrap_or_default();
    let body = format!(
        r#"<h1>Sign in</h1>
<p>to <strong>{client_id}</strong></p>
{error}
<form method="post" action="{action}">
  <input type="hidden" name="request_id" value="{request_id}">
  <label>Username <input name="username" value="{username}" autocomplete="username" autofocus></label>
  <label>Password <input name="password" type="password" autocomplete="current-password"></label>
  <div class="buttons">
    <button type="submit" name="action" value="login">Sign in</button>
    <button type="submit" name="action" value="cancel" formnovalidate>Cancel</button>
  </div>
</form>
<p class="hint">Demo account: username <code>{demo_username}</code>, password <code>{demo_password}</code></p>"#,
        client_id = escape(form.client_id),
        action = escape(form.action),
        request_id = escape(form.request_id),
        username = escape(form.username),
        demo_username = escape(form.demo_username),
        demo_password = escape(form.demo_password),
    );
    document("Sign in", &body)
}

/// An error page for requests that cannot be sent back to the client.
pub(crate) fn error_page(title: &str, message: &str) -> String {
    let body = format!("<h1>{}</h1>\n<p>{}</p>", escape(title), escape(message));
    document(title, &body)
}

/// Shown after logout when there is no registered place to return to.
pub(crate) fn signed_out_page() -> String {
    document(
        "Signed out",
        "<h1>You are signed out</h1>\n<p>You can close this window.</p>",
    )
}

/// The landing page at `/`: what this is and where its discovery document lives.
pub(crate) fn index_page(issuer: &str, discovery_url: &str) -> String {
    let body = format!(
        "<h1>Development identity provider</h1>\n<p>Issuer <code>{}</code>. \
         Discovery: <a href=\"{url}\">{url}</a></p>",
        escape(issuer),
        url = escape(discovery_url),
    );
    document("Development identity provider", &body)
}

fn document(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} — dev IdP</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 28rem; margin: 2rem auto; padding: 0 1rem; }}
.banner {{ background: #b00020; color: #fff; padding: .5rem 1rem; font-weight: bold; border-radius: 4px; }}
.error {{ color: #b00020; }}
label {{ display: block; margin: .75rem 0; }}
input {{ display: block; width: 100%; padding: .4rem; box-sizing: border-box; }}
.buttons {{ display: flex; gap: .5rem; }}
.hint {{ color: #555; font-size: .9rem; }}
</style>
</head>
<body>
<p class="banner">{banner}</p>
{body}
</body>
</html>
"#,
        title = escape(title),
        banner = escape(NOT_FOR_PRODUCTION),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn login_page_escapes_every_value() {
        let html = login_page(&LoginForm {
            action: "/authorize\"><script>",
            request_id: "<r>",
            client_id: "<c>",
            demo_username: "<u>",
            demo_password: "<p>",
            username: "\"><script>alert(1)</script>",
            error: Some("<e>"),
        });
        assert!(!html.contains("<script>"));
        assert!(!html.contains("<r>") && !html.contains("<c>") && !html.contains("<e>"));
        assert!(html.contains(NOT_FOR_PRODUCTION));
        assert!(html.contains(r#"name="request_id" value="&lt;r&gt;""#));
    }
}
