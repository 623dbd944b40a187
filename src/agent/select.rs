//! Choosing the model provider for a run, shared by `proxi agent` and `proxi demo`.

use std::fmt;
use std::str::FromStr;

use super::genai_provider::{GenaiProvider, GenaiSettings, ProviderKind};
use super::mock::MockPlanner;
use super::provider::{LlmProvider, ProviderError};

/// A provider a user can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderChoice {
    /// Google Gemini.
    Gemini,
    /// OpenAI, or any OpenAI-compatible server via `OPENAI_BASE_URL`.
    OpenAi,
    /// Anthropic.
    Anthropic,
    /// A local Ollama.
    Ollama,
    /// The deterministic planner: no key, no network.
    Mock,
}

impl FromStr for ProviderChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<ProviderChoice, String> {
        match text.to_ascii_lowercase().as_str() {
            "gemini" => Ok(ProviderChoice::Gemini),
            "openai" => Ok(ProviderChoice::OpenAi),
            "anthropic" => Ok(ProviderChoice::Anthropic),
            "ollama" => Ok(ProviderChoice::Ollama),
            "mock" => Ok(ProviderChoice::Mock),
            other => Err(format!(
                "unknown provider '{other}' (expected gemini, openai, anthropic, ollama or mock)"
            )),
        }
    }
}

impl fmt::Display for ProviderChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProviderChoice::Gemini => "gemini",
            ProviderChoice::OpenAi => "openai",
            ProviderChoice::Anthropic => "anthropic",
            ProviderChoice::Ollama => "ollama",
            ProviderChoice::Mock => "mock",
        })
    }
}

/// A ready provider and a line saying which one it is and why.
pub struct SelectedProvider {
    /// The provider.
    pub provider: Box<dyn LlmProvider>,
    /// E.g. `gemini (model gemini-2.5-flash, https://...; GOOGLE_API_KEY is set)`.
    pub description: String,
}

/// Builds the provider: the explicit choice, else Gemini when `GOOGLE_API_KEY` is set, else the mock.
///
/// `lookup` reads configuration variables (normally the process environment).
pub fn select_provider(
    choice: Option<ProviderChoice>,
    model: Option<String>,
    base_url: Option<String>,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<SelectedProvider, ProviderError> {
    let has_google_key = lookup("GOOGLE_API_KEY").is_some_and(|key| !key.trim().is_empty());
    let (choice, why) = match choice {
        Some(choice) => (choice, "chosen with --provider"),
        None if has_google_key => (ProviderChoice::Gemini, "GOOGLE_API_KEY is set"),
        None => (
            ProviderChoice::Mock,
            "no GOOGLE_API_KEY; pass --provider to use another model",
        ),
    };
    let kind = match choice {
        ProviderChoice::Mock => {
            let planner = MockPlanner::new();
            let description = format!("mock ({}; {why})", planner.model());
            return Ok(SelectedProvider {
                provider: Box::new(planner),
                description,
            });
        }
        ProviderChoice::Gemini => ProviderKind::Gemini,
        ProviderChoice::OpenAi => ProviderKind::OpenAi,
        ProviderChoice::Anthropic => ProviderKind::Anthropic,
        ProviderChoice::Ollama => ProviderKind::Ollama,
    };
    let mut settings = GenaiSettings::from_env(kind, lookup);
    if model.is_some() {
        settings.model = model;
    }
    if base_url.is_some() {
        settings.base_url = base_url;
    }
    let provider = GenaiProvider::new(settings)?;
    let description = format!(
        "{} (model {}, {}; {why})",
        provider.name(),
        provider.model(),
        provider.base_url()
    );
    Ok(SelectedProvider {
        provider: Box::new(provider),
        description,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_gemini_with_a_google_key_and_the_mock_without() {
        let none = |_: &str| None;
        let selected = select_provider(None, None, None, none).unwrap();
        assert_eq!(selected.provider.name(), "mock");
        assert!(selected.description.contains("no GOOGLE_API_KEY"));

        let with_key = |name: &str| (name == "GOOGLE_API_KEY").then(|| "k".to_owned());
        let selected = select_provider(None, None, None, with_key).unwrap();
        assert_eq!(selected.provider.name(), "gemini");
        assert!(selected.description.contains("GOOGLE_API_KEY is set"));
    }

    #[test]
    fn explicit_choices_and_overrides_win() {
        let none = |_: &str| None;
        let selected = select_provider(
            Some(ProviderChoice::Ollama),
            Some("qwen3".into()),
            Some("http://127.0.0.1:1".into()),
            none,
        )
        .unwrap();
        assert_eq!(selected.provider.model(), "qwen3");
        assert!(selected.description.contains("http://127.0.0.1:1"));
        assert_eq!(
            "OpenAI".parse::<ProviderChoice>(),
            Ok(ProviderChoice::OpenAi)
        );
        assert!("bard".parse::<ProviderChoice>().is_err());
    }
}
