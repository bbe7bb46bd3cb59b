//! The log subscriber every binary of the mesh installs: a filter, one
//! output stream, text or one JSON object per line; colour codes only when
//! the stream is a terminal and the format is text (not in a pod's log,
//! where they cost CPU on every line and clutter the text).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// Where the lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// Text or JSON lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    /// `LOG_FORMAT=json` (any case) asks for JSON; anything else is text.
    pub fn from_env() -> Format {
        Format::parse(std::env::var("LOG_FORMAT").ok().as_deref())
    }

    fn parse(value: Option<&str>) -> Format {
        match value {
            Some(v) if v.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Text,
        }
    }
}

/// `RUST_LOG`'s filter, `info` when it is unset or unreadable.
pub fn filter_from_env() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the process's subscriber; call once, first thing in `main`.
pub fn init(filter: EnvFilter, output: Output, format: Format) {
    let (writer, terminal) = match output {
        Output::Stdout => (
            BoxMakeWriter::new(std::io::stdout),
            std::io::stdout().is_terminal(),
        ),
        Output::Stderr => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
        ),
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(terminal && format == Format::Text);
    match format {
        Format::Json => logs.json().init(),
        Format::Text => logs.init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_in_any_case_asks_for_json() {
        assert_eq!(Format::parse(Some("json")), Format::Json);
        assert_eq!(Format::parse(Some("JSON")), Format::Json);
        assert_eq!(Format::parse(Some("text")), Format::Text);
        assert_eq!(Format::parse(Some("")), Format::Text);
        assert_eq!(Format::parse(None), Format::Text);
    }
}
