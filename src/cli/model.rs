//! The model flags `agent` and `demo` share.

use clap::{Args, ValueEnum};

use proxi::agent::select::ProviderChoice;

/// Which model drives the agent; shared by `agent` and `demo`.
#[derive(Args)]
pub(crate) struct ModelArgs {
    /// LLM provider (agent default: gemini when GOOGLE_API_KEY is set, else mock; demo default: mock).
    #[arg(long, value_enum)]
    pub(crate) provider: Option<ProviderArg>,
    /// Model name (default depends on the provider).
    #[arg(long)]
    model: Option<String>,
    /// Override the provider's base URL (OpenAI-compatible servers, proxies).
    #[arg(long)]
    base_url: Option<String>,
    /// Seconds one model turn may take (default: $PROXI_MODEL_TIMEOUT, else 120).
    #[arg(long, value_name = "SECONDS", value_parser = parse_model_timeout)]
    model_timeout: Option<std::time::Duration>,
    /// Sampling temperature (agent default: the provider's; demo default: 0).
    #[arg(long)]
    temperature: Option<f64>,
    /// Sampling seed, for providers that honour one (agent default: none; demo default: 0).
    #[arg(long)]
    seed: Option<u64>,
}

impl ModelArgs {
    pub(crate) fn options(&self) -> proxi::agent::select::ModelOptions {
        proxi::agent::select::ModelOptions {
            model: self.model.clone(),
            base_url: self.base_url.clone(),
            timeout: self.model_timeout,
            temperature: self.temperature,
            seed: self.seed,
        }
    }
}

fn parse_model_timeout(text: &str) -> Result<std::time::Duration, String> {
    proxi::agent::genai_provider::parse_timeout(text)
        .ok_or_else(|| "expected a positive number of seconds, at most 86400".to_owned())
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ProviderArg {
    Gemini,
    Openai,
    Anthropic,
    Ollama,
    Mock,
}

/// The library's provider choice for the `--provider` flag.
pub(crate) fn provider_choice(provider: ProviderArg) -> ProviderChoice {
    match provider {
        ProviderArg::Gemini => ProviderChoice::Gemini,
        ProviderArg::Openai => ProviderChoice::OpenAi,
        ProviderArg::Anthropic => ProviderChoice::Anthropic,
        ProviderArg::Ollama => ProviderChoice::Ollama,
        ProviderArg::Mock => ProviderChoice::Mock,
    }
}
