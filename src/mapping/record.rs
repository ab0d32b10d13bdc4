//! The record every source maps to and the producer sends: topic, key, value and headers,
//! borrowed from the decoded change so that nothing is copied per event.

/// One record ready for the producer; borrows the row and the mapper's scratch space.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Index of the source (`[[outbox]]` entries, then `[[message]]` ones) the event came
    /// from; `None` for a note about something no source could map (a malformed message).
    pub table: Option<usize>,
    /// Destination topic.
    pub topic: &'a str,
    /// Record key (`None` for a NULL key column).
    pub key: Option<&'a [u8]>,
    /// Record value (`None` for a NULL payload).
    pub payload: Option<&'a [u8]>,
    /// The event id column, sent as the `id` header.
    pub id: Option<&'a [u8]>,
    /// The event type column, sent as the `type` header.
    pub kind: Option<&'a [u8]>,
    /// The configured `header_columns`, in order (empty and unallocated when none are).
    pub extra_headers: Vec<(&'a str, Option<&'a [u8]>)>,
    /// The partition from `partition_column`; `None` lets the partitioner hash the key.
    pub partition: Option<i32>,
    /// Commit time of the event's transaction, microseconds since 2000-01-01 UTC; set by the
    /// pipeline, which knows the transaction; `None` where it is unknown (snapshot rows).
    pub time: Option<i64>,
}

impl<'a> Record<'a> {
    /// Headers in order: `id`, `type`, then the configured extra columns.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> + '_ {
        [("id", self.id), ("type", self.kind)]
            .into_iter()
            .chain(self.extra_headers.iter().copied())
    }

    /// The event id as text, for error messages.
    pub fn event_id(&self) -> String {
        match self.id {
            Some(v) => String::from_utf8_lossy(v).into_owned(),
            None => "?".into(),
        }
    }
}
