//! Choosing the model provider for a run, shared by `proxi agent` and `proxi demo`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::genai_provider::{GenaiProvider, GenaiSettings, ProviderKind};
use super::mock::MockPlanner;
use super::openai_provider::OpenAiProvider;
use super::provider::{LlmProvider, ProviderError};

/// What a user may say about the model, on top of the environment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelOptions {
    /// Model name; `None` uses the provider's default.
    pub model: Option<String>,
    /// Base URL override (OpenAI-compatible servers, proxies).
    pub base_url: Option<String>,
    /// Limit for one completion; `None` uses `PROXI_MODEL_TIMEOUT`, else the default.
    pub timeout: Option<Duration>,
    /// Sampling temperature; `None` keeps the provider's default.
    pub temperature: Option<f64>,
    /// Sampling seed; `None` sends none.
    pub seed: Option<u64>,
}

/// A real provider from settings: OpenAI through Proxi's own tolerant adapter,
/// the others through genai. Returns the provider and the base URL it uses.
pub fn build_provider(
    settings: GenaiSettings,
) -> Result<(Box<dyn LlmProvider>, String), ProviderError> {
    Ok(match settings.kind {
        ProviderKind::OpenAi => {
            let provider = OpenAiProvider::new(settings)?;
            let url = provider.base_url().to_owned();
            (Box::new(provider), url)
        }
        _ => {
            let provider = GenaiProvider::new(settings)?;
            let url = provider.base_url().to_owned();
            (Box::new(provider), url)
        }
    })
}

/// A provider a user can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderChoice {
    /// Google Gemini.
    Gemini,
    /// OpenAI, or any OpenAI-compatible server via `OPENAI_BASE_URL`.
    OpenAi,
    /// Anthropic's Messages API (`ANTHROPIC_API_KEY`).
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
    /// The provider, configured and ready for its first turn.
    pub provider: Box<dyn LlmProvider>,
    /// E.g. `gemini (model gemini-2.5-flash, https://...; GOOGLE_API_KEY is set)`.
    pub description: String,
}

/// Builds the provider: the explicit choice, else Gemini when `GOOGLE_API_KEY` is set, else the mock.
///
/// `lookup` reads configuration variables (normally the process environment).
pub fn select_provider(
    choice: Option<ProviderChoice>,
    options: &ModelOptions,
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
    let mut settings = GenaiSettings::from_env(kind, lookup)?;
    if options.model.is_some() {
        settings.model = options.model.clone();
    }
    if options.base_url.is_some() {
        settings.base_url = options.base_url.clone();
    }
    if let Some(timeout) = options.timeout {
        settings.timeout = timeout;
    }
    settings.temperature = options.temperature;
    settings.seed = options.seed;
    let timeout = settings.timeout;
    let (provider, base_url) = build_provider(settings)?;
    let description = format!(
        "{} (model {}, {base_url}, timeout {} s; {why})",
        provider.name(),
        provider.model(),
        timeout.as_secs_f64()
    );
    Ok(SelectedProvider {
        provider,
        description,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_gemini_with_a_google_key_and_the_mock_without() {
        let none = |_: &str| None;
        let selected = select_provider(None, &ModelOptions::default(), none).unwrap();
        assert_eq!(selected.provider.name(), "mock");
        assert!(selected.description.contains("no GOOGLE_API_KEY"));

        let with_key = |name: &str| (name == "GOOGLE_API_KEY").then(|| "k".to_owned());
        let selected = select_provider(None, &ModelOptions::default(), with_key).unwrap();
        assert_eq!(selected.provider.name(), "gemini");
        assert!(selected.description.contains("GOOGLE_API_KEY is set"));
    }

    #[test]
    fn explicit_choices_and_overrides_win() {
        let none = |_: &str| None;
        let options = ModelOptions {
            model: Some("qwen3".into()),
            base_url: Some("http://127.0.0.1:1".into()),
            ..ModelOptions::default()
        };
        let selected = select_provider(Some(ProviderChoice::Ollama), &options, none).unwrap();
        assert_eq!(selected.provider.model(), "qwen3");
        assert!(selected.description.contains("http://127.0.0.1:1"));
        assert_eq!(
            "OpenAI".parse::<ProviderChoice>(),
            Ok(ProviderChoice::OpenAi)
        );
        assert!("bard".parse::<ProviderChoice>().is_err());
    }

    #[test]
    fn the_model_timeout_comes_from_the_flag_else_the_environment() {
        let env = |name: &str| match name {
            "PROXI_MODEL_TIMEOUT" => Some("300".to_owned()),
            "OPENAI_API_KEY" => Some("k".to_owned()),
            _ => None,
        };
        let selected =
            select_provider(Some(ProviderChoice::OpenAi), &ModelOptions::default(), env).unwrap();
        assert!(
            selected.description.contains("timeout 300 s"),
            "{}",
            selected.description
        );
        let options = ModelOptions {
            timeout: Some(Duration::from_secs(7)),
            ..ModelOptions::default()
        };
        let selected = select_provider(Some(ProviderChoice::OpenAi), &options, env).unwrap();
        assert!(
            selected.description.contains("timeout 7 s"),
            "{}",
            selected.description
        );
        let bad = |name: &str| (name == "PROXI_MODEL_TIMEOUT").then(|| "soon".to_owned());
        let error = select_provider(Some(ProviderChoice::Ollama), &ModelOptions::default(), bad)
            .err()
            .unwrap();
        assert!(error.to_string().contains("PROXI_MODEL_TIMEOUT"), "{error}");
    }
}
