//! Paging of the list endpoints: `limit` and `marker` in, one extra row fetched to know
//! whether a `next_marker` is due.

use protocol::cloud::{DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT};

use crate::error::{Error, Result};

/// One page request of a list endpoint: at most `limit` items with ids after `marker`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Most items on the page (1 to 500).
    pub limit: usize,
    /// Only ids after this one; `None` for the first page.
    pub marker: Option<String>,
}

impl Page {
    /// From the query parameters: `limit` defaults to 50 and is capped at 500.
    pub fn new(limit: Option<usize>, marker: Option<String>) -> Result<Self> {
        let limit = limit.unwrap_or(DEFAULT_PAGE_LIMIT);
        if limit == 0 {
            return Err(Error::BadRequest(format!("limit must be between 1 and {MAX_PAGE_LIMIT}")));
        }
        Ok(Self { limit: limit.min(MAX_PAGE_LIMIT), marker: marker.filter(|m| !m.is_empty()) })
    }

    /// Store methods fetch `limit + 1` rows; this cuts the extra one off and answers the
    /// `next_marker` (the last id of the page) when it existed.
    pub fn finish<T>(&self, mut rows: Vec<T>, id: impl Fn(&T) -> &str) -> (Vec<T>, Option<String>) {
        if rows.len() > self.limit {
            rows.truncate(self.limit);
            let next = rows.last().map(|r| id(r).to_string());
            (rows, next)
        } else {
            (rows, None)
        }
    }

    pub(super) fn fetch(&self) -> i64 {
        (self.limit + 1) as i64
    }

    pub(super) fn after(&self) -> &str {
        self.marker.as_deref().unwrap_or("")
    }
}
