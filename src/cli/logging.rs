//! Where the binary's words go: the log subscriber on stderr (text or JSON) and
//! the notices and errors written for people.

use clap::ValueEnum;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// Whether stderr gets ANSI colours: only on a terminal, and never when `NO_COLOR`
/// is set to anything non-empty (<https://no-color.org>).
fn stderr_colours() -> bool {
    use std::io::IsTerminal;
    colours_allowed(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// Whether `NO_COLOR` forbids colour on stdout (the demo transcript).
pub(crate) fn no_color() -> bool {
    !colours_allowed(true, std::env::var_os("NO_COLOR").as_deref())
}

fn colours_allowed(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// Installs the log subscriber on stderr: `RUST_LOG`, else `default_level`.
pub(crate) fn init_logging(default_level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Logs go to stderr so stdout stays clean for data (and for MCP over stdio).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(stderr_colours()).try_init(),
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .with_current_span(false)
            .try_init(),
    };
}

/// Tells a person something on stderr: a plain line, or under `--log-format json`
/// an info event, so that stderr carries nothing but JSON.
pub(crate) fn notice(format: LogFormat, text: &str) {
    match format {
        LogFormat::Text => eprintln!("{text}"),
        LogFormat::Json => tracing::info!("{text}"),
    }
}

/// Reports the error a command ended with: `error: ...`, or an error event under
/// `--log-format json`.
pub(crate) fn report_error(format: LogFormat, message: &str) {
    match format {
        LogFormat::Text => eprintln!("error: {message}"),
        LogFormat::Json => tracing::error!("{message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_needs_a_terminal_and_no_no_color() {
        assert!(colours_allowed(true, None));
        assert!(colours_allowed(true, Some(OsStr::new(""))));
        assert!(!colours_allowed(true, Some(OsStr::new("1"))));
        assert!(!colours_allowed(false, None));
    }
}
