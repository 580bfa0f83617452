//! How results are printed: aligned tables (coloured only on a terminal without
//! `NO_COLOR`), JSON or YAML, ages, and webhook URLs with their token masked.

use std::io::{IsTerminal, Write};

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use crate::context::Output;

/// Whether to colour what goes to stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Style {
    pub colour: bool,
}

impl Style {
    /// Colour only when stdout is a terminal and `NO_COLOR` is unset or empty
    /// (<https://no-color.org>).
    pub fn detect() -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Self {
            colour: !no_color && std::io::stdout().is_terminal(),
        }
    }

    /// `text` in the colour its meaning has (phases, Ready states), when colouring.
    pub fn paint(self, text: &str) -> String {
        match (self.colour, colour_of(text)) {
            (true, Some(code)) => format!("\x1b[{code}m{text}\x1b[0m"),
            _ => text.to_owned(),
        }
    }

    /// `text` dimmed (timestamps, ids), when colouring.
    pub fn dim(self, text: &str) -> String {
        if self.colour {
            format!("\x1b[2m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

/// The ANSI colour of a word that says how something stands.
fn colour_of(text: &str) -> Option<&'static str> {
    match text {
        "Complete" | "True" | "Active" | "delivered" => Some("32"),
        "Error" | "False" | "Revoked" | "Expired" => Some("31"),
        "Running" | "Pending" | "Queued" | "buffered" | "Unknown" => Some("33"),
        _ => None,
    }
}

/// A table as kubectl prints one: upper-case headers, columns padded to their widest
/// cell and three spaces apart. Widths are measured on the plain text, so colour codes
/// added afterwards never misalign a column.
pub fn render_table(headers: &[&str], rows: &[Vec<String>], style: Style) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = (String, String)>| {
        let mut text = String::new();
        let cells: Vec<_> = cells.collect();
        let last = cells.len().saturating_sub(1);
        for (i, (plain, shown)) in cells.into_iter().enumerate() {
            text.push_str(&shown);
            if i < last {
                let pad = widths[i] - plain.chars().count() + 3;
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().map(|h| (h.to_string(), h.to_string())));
    for row in rows {
        line(
            &mut row
                .iter()
                .take(widths.len())
                .map(|c| (c.clone(), style.paint(c))),
        );
    }
    out
}

/// An age as kubectl shows it: `42s`, `7m`, `3h`, `5d`.
pub fn age(since: Timestamp, now: Timestamp) -> String {
    let seconds = now.as_second().saturating_sub(since.as_second()).max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// What stands in for a token that is not shown.
pub const MASK: &str = "****";

/// A webhook or Grant URL with its token (the last path segment) replaced by [`MASK`].
pub fn mask_token(url: &str) -> String {
    let path_start = url.find("://").map_or(0, |i| i + 3);
    match url[path_start..].rfind('/') {
        Some(i) if path_start + i + 1 < url.len() => {
            format!("{}{MASK}", &url[..path_start + i + 1])
        }
        _ => url.to_owned(),
    }
}

/// Writes `value` as JSON or YAML, as `-o` asks; `Output::Table` callers print their own.
pub fn print_value<T: Serialize>(output: Output, value: &T) -> anyhow::Result<()> {
    let text = match output {
        Output::Json | Output::Table => serde_json::to_string_pretty(value)? + "\n",
        Output::Yaml => serde_yaml::to_string(value)?,
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: Style = Style { colour: false };

    #[test]
    fn tables_align_on_the_widest_cell() {
        let rows = vec![
            vec!["echo".to_owned(), "True".to_owned(), "webhook".to_owned()],
            vec![
                "a-longer-name".to_owned(),
                "False".to_owned(),
                "".to_owned(),
            ],
        ];
        let text = render_table(&["NAME", "READY", "TRIGGERS"], &rows, PLAIN);
        assert_eq!(
            text,
            "NAME            READY   TRIGGERS\n\
             echo            True    webhook\n\
             a-longer-name   False\n"
        );
    }

    #[test]
    fn colour_never_shifts_columns() {
        let rows = vec![vec![
            "s1".to_owned(),
            "Complete".to_owned(),
            "1s".to_owned(),
        ]];
        let coloured = render_table(&["NAME", "PHASE", "AGE"], &rows, Style { colour: true });
        assert!(
            coloured.contains("\x1b[32mComplete\x1b[0m   1s"),
            "{coloured:?}"
        );
        let plain = render_table(&["NAME", "PHASE", "AGE"], &rows, PLAIN);
        let strip = coloured.replace("\x1b[32m", "").replace("\x1b[0m", "");
        assert_eq!(strip, plain);
    }

    #[test]
    fn ages_read_like_kubectl() {
        let now: Timestamp = "2026-01-02T00:00:00Z".parse().expect("a time");
        let at = |s: &str| s.parse::<Timestamp>().expect("a time");
        assert_eq!(age(at("2026-01-01T23:59:18Z"), now), "42s");
        assert_eq!(age(at("2026-01-01T23:53:00Z"), now), "7m");
        assert_eq!(age(at("2026-01-01T21:00:00Z"), now), "3h");
        assert_eq!(age(at("2025-12-28T00:00:00Z"), now), "5d");
        assert_eq!(age(at("2026-01-03T00:00:00Z"), now), "0s");
    }

    #[test]
    fn tokens_are_masked() {
        assert_eq!(
            mask_token("https://hooks.example.com/webhooks/team/echo/abcDEF123"),
            "https://hooks.example.com/webhooks/team/echo/****"
        );
        assert_eq!(
            mask_token("http://127.0.0.1:8080/hook/tok"),
            "http://127.0.0.1:8080/hook/****"
        );
        assert_eq!(mask_token("http://h.example/"), "http://h.example/");
        assert_eq!(mask_token("http://h.example"), "http://h.example");
    }
}
