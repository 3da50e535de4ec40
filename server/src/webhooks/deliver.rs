//! One attempt at delivering one message to one endpoint: a signed POST with a time limit, and
//! what its answer means (delivered; refused for good; try again later), and when to try again.

use std::time::Duration;

use super::sign::Secret;

/// The longest wait between two attempts at one message.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// What came of an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer.
    Delivered,
    /// A 4xx answer other than 408 and 429: the receiver does not want it, and asking again
    /// would not change its mind. Why, in words.
    Refused(String),
    /// Anything else (no connection, no answer in time, 408, 429, 5xx, a redirect): try
    /// again later. Why, in words.
    Failed(String),
}

/// What an HTTP answer's status means.
pub fn judge(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered,
        408 | 429 => Outcome::Failed(format!("the receiver answered {status}; trying again")),
        400..=499 => Outcome::Refused(format!(
            "the receiver answered {status}, which is not retried"
        )),
        300..=399 => Outcome::Failed(format!(
            "the receiver answered {status} (redirects are not followed: give --webhook the \
             final URL)"
        )),
        _ => Outcome::Failed(format!("the receiver answered {status}")),
    }
}

/// The wait after the `attempts`-th failed attempt: `base` doubled each time, at most
/// [`MAX_BACKOFF`].
pub fn backoff(base: Duration, attempts: u32) -> Duration {
    let doubled = base.saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
    doubled.min(MAX_BACKOFF)
}

/// A message, as it is sent: the same ID on every attempt, a fresh timestamp and signature.
pub struct Message<'a> {
    pub id: &'a str,
    pub body: &'a [u8],
}

/// An endpoint's HTTP client: connections kept, a time limit on connecting and on the whole
/// request, no redirects followed.
pub struct Client {
    http: reqwest::Client,
    url: reqwest::Url,
    timeout: Duration,
}

impl Client {
    pub fn new(url: reqwest::Url, timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pipeline-server/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot make the webhooks' HTTP client: {e}"))?;
        Ok(Self { http, url, timeout })
    }

    /// Sends `message` once, signed with `secret` at `now_secs`.
    pub async fn send(&self, secret: &Secret, message: &Message<'_>, now_secs: i64) -> Outcome {
        let signature = secret.sign(message.id, now_secs, message.body);
        let sent = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", message.id)
            .header("webhook-timestamp", now_secs.to_string())
            .header("webhook-signature", signature)
            .body(message.body.to_vec())
            .send()
            .await;
        match sent {
            Ok(answer) => judge(answer.status().as_u16()),
            Err(e) => Outcome::Failed(self.failure(e)),
        }
    }

    /// Why a request got no answer, in one line (without the URL, which may hold a secret).
    fn failure(&self, e: reqwest::Error) -> String {
        let e = e.without_url();
        if e.is_timeout() {
            return format!("no answer within {:?}", self.timeout);
        }
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            why = format!("{why}: {cause}");
            source = cause.source();
        }
        if e.is_connect() {
            format!("cannot connect: {why}")
        } else {
            why
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_2xx_is_delivered_a_4xx_refused_but_408_and_429_and_the_rest_retried() {
        assert_eq!(judge(200), Outcome::Delivered);
        assert_eq!(judge(204), Outcome::Delivered);
        assert!(matches!(judge(400), Outcome::Refused(_)));
        assert!(matches!(judge(410), Outcome::Refused(_)));
        assert!(matches!(judge(408), Outcome::Failed(_)));
        assert!(matches!(judge(429), Outcome::Failed(_)));
        assert!(matches!(judge(500), Outcome::Failed(_)));
        assert!(matches!(judge(503), Outcome::Failed(_)));
        assert!(matches!(judge(301), Outcome::Failed(_)));
    }

    #[test]
    fn back_off_doubles_up_to_an_hour() {
        let base = Duration::from_secs(5);
        assert_eq!(backoff(base, 1), Duration::from_secs(5));
        assert_eq!(backoff(base, 2), Duration::from_secs(10));
        assert_eq!(backoff(base, 5), Duration::from_secs(80));
        assert_eq!(backoff(base, 12), MAX_BACKOFF);
        assert_eq!(backoff(base, u32::MAX), MAX_BACKOFF);
    }
}
