//! Where a key is written in the config file, for error messages. The text is parsed again with
//! spans, so comments, dotted keys and inline tables are the TOML parser's business, not a text
//! search's (a comment naming `[server]` once made every `[server]` error lose its line).

use std::ops::Range;

use toml_edit::{ImDocument, Item, TableLike};

/// Spans of the keys in one config text.
pub struct Locator<'a> {
    /// `None` when the text does not parse; the serde pass reports that error itself.
    document: Option<ImDocument<&'a str>>,
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str) -> Locator<'a> {
        Locator {
            document: ImDocument::parse(text).ok(),
        }
    }

    /// Where `path` (`server.listen`, `upstream.health.timeout`) is written: its key.
    pub fn key(&self, path: &str) -> Option<Range<usize>> {
        let (parent, last) = match path.rsplit_once('.') {
            Some((parent, last)) => (self.table_like(parent)?, last),
            None => (self.document.as_ref()?.as_table() as &dyn TableLike, path),
        };
        let (key, item) = parent.get_key_value(last)?;
        key.span().or_else(|| item.span())
    }

    /// Where the table `path` (`auth`) is: its `[auth]` header, or the first key that made it.
    pub fn table(&self, path: &str) -> Option<Range<usize>> {
        let table = self.table_like(path)?;
        match self.item(path)? {
            Item::Table(t) if t.span().is_some() => t.span(),
            _ => table
                .iter()
                .next()
                .and_then(|(name, _)| self.key(&format!("{path}.{name}"))),
        }
    }

    /// The `prefix` key of the `index`-th `[[route]]` table (counted from 0, as written).
    pub fn route_prefix(&self, index: usize) -> Option<Range<usize>> {
        let routes = self.item("route")?.as_array_of_tables()?;
        let (key, item) = routes.get(index)?.get_key_value("prefix")?;
        key.span().or_else(|| item.span())
    }

    /// A table written with the other kind of brackets: `[[upstream]]` (a list of tables) for
    /// one of the single tables, or `[route]` for the list `[[route]]`. The key, where it is
    /// written, and what to write instead.
    pub fn wrong_brackets(&self) -> Option<(&'static str, usize, String)> {
        const SINGLE: [&str; 6] = ["server", "upstream", "admin", "log", "limits", "auth"];
        let root = self.document.as_ref()?.as_table();
        for name in SINGLE {
            if let Some(Item::ArrayOfTables(tables)) = root.get(name) {
                let at = tables.get(0).and_then(|t| t.span()).unwrap_or(0..0);
                return Some((
                    name,
                    at.start,
                    format!("[[{name}]] is a list of tables: write [{name}], one table"),
                ));
            }
        }
        match root.get("route") {
            Some(Item::Table(table)) => Some((
                "route",
                table.span().unwrap_or(0..0).start,
                "[route] is one table: write each route as [[route]], a list of tables".into(),
            )),
            _ => None,
        }
    }

    fn item(&self, path: &str) -> Option<&Item> {
        let mut segments = path.split('.');
        let first = segments.next()?;
        let mut item = self.document.as_ref()?.as_table().get(first)?;
        for segment in segments {
            item = item.as_table_like()?.get(segment)?;
        }
        Some(item)
    }

    fn table_like(&self, path: &str) -> Option<&dyn TableLike> {
        self.item(path)?.as_table_like()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn line(text: &str, span: Option<Range<usize>>) -> usize {
        text[..span.unwrap().start].matches('\n').count() + 1
    }

    #[test]
    fn keys_are_found_where_the_parser_read_them_not_where_a_comment_names_them() {
        let text = "# The [server] table below; in [admin] too: listen = nothing\n\
                    [server]\n\
                    # listen = \"commented out\"\n\
                    listen = \"127.0.0.1:8080\"\n\
                    [upstream]\n\
                    health.timeout = \"1s\"\n\
                    backends = [{ addr = \"127.0.0.1:1\" }]\n\
                    [admin]\n\
                    listen = \"127.0.0.1:9090\"\n\
                    [[route]]\nprefix = \"/a\"\n[[route]]\n\n# prefix = \"/no\"\nprefix = \"/b\"\n";
        let at = Locator::new(text);
        assert_eq!(line(text, at.key("server.listen")), 4);
        assert_eq!(line(text, at.key("upstream.health.timeout")), 6);
        assert_eq!(line(text, at.key("admin.listen")), 9);
        assert_eq!(line(text, at.table("admin")), 8);
        assert_eq!(line(text, at.route_prefix(1)), 15);
        assert_eq!(at.key("server.threads"), None);
        assert_eq!(at.table("auth"), None);
        assert_eq!(Locator::new("not [toml").key("server.listen"), None);
    }
}
