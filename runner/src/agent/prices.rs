//! Prices per million tokens, for agents that report tokens but not money (Codex), and for a
//! Claude run cut off before its final report. Shipped defaults, which `--price-table FILE`
//! adds to and overrides. A cost computed here is recorded as *estimated*.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::usage::Usage;

/// US dollars per million tokens of each kind.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    /// Cached input (read from the prompt cache); the input price when absent.
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Writing the prompt cache; the input price when absent.
    #[serde(default)]
    pub cache_write: Option<f64>,
    pub output: f64,
}

/// The table: model name → price; a model not in it is priced as `default`.
#[derive(Clone, Debug)]
pub struct Prices {
    by_model: HashMap<String, Price>,
}

/// (model, input, cached input, output) in USD per million tokens, as published by the
/// providers; `default` prices a model the table does not know.
const DEFAULTS: &[(&str, f64, f64, f64)] = &[
    ("default", 1.25, 0.125, 10.0),
    ("gpt-5", 1.25, 0.125, 10.0),
    ("gpt-5-codex", 1.25, 0.125, 10.0),
    ("gpt-5-mini", 0.25, 0.025, 2.0),
    ("o4-mini", 1.1, 0.275, 4.4),
    ("claude-sonnet-4", 3.0, 0.3, 15.0),
    ("claude-opus-4", 15.0, 1.5, 75.0),
];

impl Default for Prices {
    fn default() -> Self {
        let by_model = DEFAULTS
            .iter()
            .map(|&(model, input, cached, output)| {
                let price = Price {
                    input,
                    cached_input: Some(cached),
                    cache_write: None,
                    output,
                };
                (model.to_owned(), price)
            })
            .collect();
        Self { by_model }
    }
}

impl Prices {
    /// The defaults with `file`'s entries over them.
    pub fn load(file: Option<&Path>) -> Result<Self, String> {
        let mut prices = Self::default();
        let Some(file) = file else {
            return Ok(prices);
        };
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read --price-table {}: {e}", file.display()))?;
        let table: HashMap<String, Price> = serde_json::from_str(&text)
            .map_err(|e| format!("--price-table {} is not a price table: {e}", file.display()))?;
        for (model, price) in table {
            let all = [
                Some(price.input),
                price.cached_input,
                price.cache_write,
                Some(price.output),
            ];
            if all.into_iter().flatten().any(|p| !p.is_finite() || p < 0.0) {
                return Err(format!(
                    "--price-table {}: the prices of {model} must be numbers ≥ 0",
                    file.display()
                ));
            }
            prices.by_model.insert(model, price);
        }
        Ok(prices)
    }

    /// The price of `model`: its own, else that of the longest known prefix of it (dated
    /// versions of a model), else the default.
    pub fn of(&self, model: Option<&str>) -> Price {
        let model = model.unwrap_or("default");
        if let Some(p) = self.by_model.get(model) {
            return *p;
        }
        self.by_model
            .iter()
            .filter(|(name, _)| model.starts_with(name.as_str()))
            .max_by_key(|(name, _)| name.len())
            .or_else(|| self.by_model.get_key_value("default"))
            .map(|(_, p)| *p)
            .unwrap_or(Price {
                input: 0.0,
                cached_input: None,
                cache_write: None,
                output: 0.0,
            })
    }

    /// What `usage`'s tokens cost, in cents.
    pub fn cents(&self, usage: &Usage) -> f64 {
        let p = self.of(usage.model.as_deref());
        let per = |tokens: u64, usd: f64| tokens as f64 * usd / 1_000_000.0;
        let fresh = usage
            .input_tokens
            .saturating_sub(usage.cached_input_tokens)
            .saturating_sub(usage.cache_write_tokens);
        let usd = per(fresh, p.input)
            + per(usage.cached_input_tokens, p.cached_input.unwrap_or(p.input))
            + per(usage.cache_write_tokens, p.cache_write.unwrap_or(p.input))
            + per(usage.output_tokens, p.output);
        usd * 100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_priced_by_kind_and_model() {
        let prices = Prices::default();
        let mut u = Usage::new("codex");
        u.model = Some("gpt-5-codex".into());
        u.input_tokens = 1_000_000;
        u.cached_input_tokens = 400_000;
        u.output_tokens = 100_000;
        // 600k fresh × $1.25 + 400k cached × $0.125 + 100k out × $10 = $0.75 + $0.05 + $1.
        assert!(
            (prices.cents(&u) - 180.0).abs() < 1e-9,
            "{}",
            prices.cents(&u)
        );
        assert_eq!(
            prices.of(Some("gpt-5-codex-2026-01")),
            prices.of(Some("gpt-5-codex"))
        );
        assert_eq!(prices.of(Some("unheard-of")), prices.of(None));
    }

    #[test]
    fn a_table_file_adds_and_overrides() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("prices.json");
        std::fs::write(
            &file,
            r#"{"gpt-5": {"input": 2, "output": 20}, "mine": {"input": 1, "output": 1}}"#,
        )
        .expect("write");
        let prices = Prices::load(Some(&file)).expect("load");
        assert_eq!(prices.of(Some("gpt-5")).input, 2.0);
        assert_eq!(prices.of(Some("mine")).output, 1.0);
        std::fs::write(&file, r#"{"bad": {"input": -1, "output": 1}}"#).expect("write");
        assert!(Prices::load(Some(&file)).is_err());
        std::fs::write(&file, "not json").expect("write");
        let err = Prices::load(Some(&file)).expect_err("refused");
        assert!(err.contains("is not a price table"), "{err}");
    }
}
