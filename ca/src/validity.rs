//! How long an issued certificate is valid, and the default lifetimes of CA and party
//! certificates.

use protocol::pki::rfc3339;
use protocol::{Error, Result};
use time::{Duration, OffsetDateTime};

/// Default lifetime of an issued certificate.
pub const DEFAULT_LEAF_DAYS: u32 = 365;
/// Lifetime of a generated CA certificate.
pub const CA_DAYS: u32 = 3650;

/// How long an issued certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From five minutes ago (clock skew between hosts) for this many days.
    Days(u32),
    /// Exactly this window (tests use it to make expired or not-yet-valid certificates).
    Between {
        /// Start of validity.
        not_before: OffsetDateTime,
        /// End of validity (notAfter).
        not_after: OffsetDateTime,
    },
}

impl Validity {
    /// The (notBefore, notAfter) window; refuses 0 days and a window that ends before it starts.
    pub(crate) fn window(self) -> Result<(OffsetDateTime, OffsetDateTime)> {
        let (nb, na) = match self {
            Validity::Days(0) => return Err(Error::Certificate("validity of 0 days: must be at least 1".into())),
            Validity::Days(d) => {
                let now = OffsetDateTime::now_utc();
                (now - Duration::minutes(5), now + Duration::days(i64::from(d)))
            }
            Validity::Between { not_before, not_after } => (not_before, not_after),
        };
        if na <= nb {
            return Err(Error::Certificate(format!(
                "validity ends ({}) before it starts ({})",
                rfc3339(na),
                rfc3339(nb)
            )));
        }
        Ok((nb, na))
    }
}
