//! The high-availability rules: what a primary and its physical standbys need so that the
//! relay's logical slot survives a failover. PostgreSQL 17 synchronises a slot created with
//! FAILOVER to standbys that set `sync_replication_slots = on` (with `hot_standby_feedback`
//! and a `primary_slot_name`, and `wal_level = logical` on the standby too), and the
//! primary's `synchronized_standby_slots` keeps logical decoding from getting ahead of those
//! standbys, so the synchronised slot is never behind what the relay confirmed. Before 17 a
//! slot is not kept on standbys at all; the lost-slot guard (see `catalog::read_guard`) is
//! then what stops the relay from skipping events after a failover.
//!
//! One query reads a server's settings into [`HaReading`]; the verdicts are plain functions of
//! readings, so `check` prints them and the unit tests judge rows without a server.

use tokio_postgres::Client;

use crate::postgres::errors::PgError;

/// `server_version_num` of PostgreSQL 17, the first with failover slots.
pub const FAILOVER_SLOTS_SINCE: i32 = 170_000;

/// The settings of one server that failover of a logical slot depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HaReading {
    /// `server_version_num`.
    pub version_num: i32,
    /// `server_version`, for people.
    pub version: String,
    /// `pg_is_in_recovery()`: a standby.
    pub in_recovery: bool,
    /// `wal_level`.
    pub wal_level: String,
    /// `sync_replication_slots`; `None` before PostgreSQL 17.
    pub sync_replication_slots: Option<String>,
    /// `hot_standby_feedback`.
    pub hot_standby_feedback: String,
    /// `primary_slot_name`: the physical slot on the primary that this standby streams from.
    pub primary_slot_name: String,
    /// `synchronized_standby_slots`; `None` before PostgreSQL 17.
    pub synchronized_standby_slots: Option<String>,
    /// The physical slots on this server.
    pub physical_slots: Vec<String>,
}

impl HaReading {
    /// Whether this server has failover slots.
    pub fn has_failover_slots(&self) -> bool {
        self.version_num >= FAILOVER_SLOTS_SINCE
    }

    /// The slots `synchronized_standby_slots` names.
    pub fn standby_slots(&self) -> Vec<&str> {
        self.synchronized_standby_slots
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().trim_matches('"'))
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// Reads the settings; unknown ones (before 17) are `None`.
pub async fn read(client: &Client) -> Result<HaReading, PgError> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int4, current_setting('server_version'), \
                    pg_is_in_recovery(), current_setting('wal_level'), \
                    current_setting('sync_replication_slots', true), \
                    current_setting('hot_standby_feedback'), current_setting('primary_slot_name'), \
                    current_setting('synchronized_standby_slots', true), \
                    ARRAY(SELECT slot_name::text FROM pg_replication_slots \
                          WHERE slot_type = 'physical' ORDER BY 1)",
            &[],
        )
        .await?;
    let get = |e: tokio_postgres::Error| PgError::unreadable("the high-availability settings", &e);
    Ok(HaReading {
        version_num: row.try_get(0).map_err(get)?,
        version: row.try_get(1).map_err(get)?,
        in_recovery: row.try_get(2).map_err(get)?,
        wal_level: row.try_get(3).map_err(get)?,
        sync_replication_slots: row.try_get(4).map_err(get)?,
        hot_standby_feedback: row.try_get(5).map_err(get)?,
        primary_slot_name: row.try_get(6).map_err(get)?,
        synchronized_standby_slots: row.try_get(7).map_err(get)?,
        physical_slots: row.try_get(8).map_err(get)?,
    })
}

/// A setting missing for the relay's slot to survive a failover, naming the parameter to set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HaWarning {
    /// The primary lets logical decoding run ahead of its standbys.
    #[error("synchronized_standby_slots is not set on the primary: the relay may confirm changes a standby has not received, and after a failover the slot synchronised to it would be behind and unusable; set synchronized_standby_slots = '<slot>' to each standby's physical slot (its primary_slot_name; {physical}) and reload")]
    NoStandbySlots {
        /// The physical slots on the primary, in words.
        physical: String,
    },
    /// `synchronized_standby_slots` names a slot the primary does not have.
    #[error("synchronized_standby_slots on the primary names {slot}, which is not a physical slot there: logical decoding waits for it forever; create it (SELECT pg_create_physical_replication_slot('{slot}')) or fix synchronized_standby_slots")]
    UnknownStandbySlot {
        /// The slot.
        slot: String,
    },
    /// The standby cannot decode, so it cannot keep a synchronised slot.
    #[error("standby {host}: wal_level is {value:?}; slot synchronization needs wal_level = logical on the standby too (restart)")]
    StandbyWalLevel {
        /// The standby.
        host: String,
        /// Its `wal_level`.
        value: String,
    },
    /// The standby does not synchronise slots.
    #[error("standby {host}: sync_replication_slots is off, so the relay's slot is not kept there and is lost in a failover to it; set sync_replication_slots = on (and a dbname in primary_conninfo) and reload")]
    NoSlotSync {
        /// The standby.
        host: String,
    },
    /// Without feedback the primary may remove rows the synchronised slot still needs.
    #[error("standby {host}: hot_standby_feedback is off, so the slot synchronised there can be invalidated; set hot_standby_feedback = on and reload")]
    NoFeedback {
        /// The standby.
        host: String,
    },
    /// The standby streams without a physical slot.
    #[error("standby {host}: primary_slot_name is not set; slot synchronization needs the standby to stream from a physical slot: create one on the primary (SELECT pg_create_physical_replication_slot('<name>')), set primary_slot_name = '<name>' here and list it in the primary's synchronized_standby_slots")]
    NoPrimarySlot {
        /// The standby.
        host: String,
    },
    /// The standby's `primary_slot_name` is not a physical slot on the primary.
    #[error("standby {host}: primary_slot_name = {slot:?} is not a physical slot on the primary; create it there (SELECT pg_create_physical_replication_slot('{slot}')) or fix primary_slot_name")]
    PrimarySlotMissing {
        /// The standby.
        host: String,
        /// Its `primary_slot_name`.
        slot: String,
    },
    /// The primary does not wait for this standby's slot.
    #[error("standby {host}: its slot {slot} is not in the primary's synchronized_standby_slots ({listed}), so the relay may confirm changes this standby has not received; add it to synchronized_standby_slots on the primary and reload")]
    NotSynchronized {
        /// The standby.
        host: String,
        /// Its `primary_slot_name`.
        slot: String,
        /// What the primary lists.
        listed: String,
    },
}

/// Why failover slots do not apply: the server predates them.
pub fn too_old(primary: &HaReading) -> Option<String> {
    (!primary.has_failover_slots()).then(|| format!(
        "failover slots need PostgreSQL 17 (server {}): a logical slot is not kept on standbys, so after a failover the relay's slot is gone; the lost-slot guard then stops the relay instead of skipping events, and its message says how to recover",
        primary.version
    ))
}

/// What the primary lacks (PostgreSQL 17 and later).
pub fn primary_warnings(primary: &HaReading) -> Vec<HaWarning> {
    let listed = primary.standby_slots();
    if listed.is_empty() {
        let physical = if primary.physical_slots.is_empty() {
            "there is no physical slot yet: create one per standby".to_owned()
        } else {
            format!("physical slots here: {}", primary.physical_slots.join(", "))
        };
        return vec![HaWarning::NoStandbySlots { physical }];
    }
    listed
        .into_iter()
        .filter(|slot| !primary.physical_slots.iter().any(|p| p == slot))
        .map(|slot| HaWarning::UnknownStandbySlot {
            slot: slot.to_owned(),
        })
        .collect()
}

/// What the standby at `host` lacks to keep the relay's slot for a failover from `primary`.
pub fn standby_warnings(host: &str, standby: &HaReading, primary: &HaReading) -> Vec<HaWarning> {
    let host = host.to_owned();
    let mut warnings = Vec::new();
    if standby.wal_level != "logical" {
        warnings.push(HaWarning::StandbyWalLevel {
            host: host.clone(),
            value: standby.wal_level.clone(),
        });
    }
    if standby.sync_replication_slots.as_deref() != Some("on") {
        warnings.push(HaWarning::NoSlotSync { host: host.clone() });
    }
    if standby.hot_standby_feedback != "on" {
        warnings.push(HaWarning::NoFeedback { host: host.clone() });
    }
    let slot = standby.primary_slot_name.trim();
    let listed = primary.standby_slots();
    if slot.is_empty() {
        warnings.push(HaWarning::NoPrimarySlot { host });
    } else if !primary.physical_slots.iter().any(|p| p == slot) {
        warnings.push(HaWarning::PrimarySlotMissing {
            host,
            slot: slot.to_owned(),
        });
    } else if !listed.is_empty() && !listed.contains(&slot) {
        // An empty list is the primary's own warning.
        warnings.push(HaWarning::NotSynchronized {
            host,
            slot: slot.to_owned(),
            listed: listed.join(", "),
        });
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary() -> HaReading {
        HaReading {
            version_num: 170_002,
            version: "17.2".into(),
            in_recovery: false,
            wal_level: "logical".into(),
            sync_replication_slots: Some("off".into()),
            hot_standby_feedback: "off".into(),
            primary_slot_name: String::new(),
            synchronized_standby_slots: Some("standby1".into()),
            physical_slots: vec!["standby1".into()],
        }
    }

    fn standby() -> HaReading {
        HaReading {
            in_recovery: true,
            sync_replication_slots: Some("on".into()),
            hot_standby_feedback: "on".into(),
            primary_slot_name: "standby1".into(),
            synchronized_standby_slots: Some(String::new()),
            physical_slots: Vec::new(),
            ..primary()
        }
    }

    #[test]
    fn a_primary_and_standby_set_up_for_failover_slots_have_nothing_to_warn() {
        assert_eq!(too_old(&primary()), None);
        assert_eq!(primary_warnings(&primary()), []);
        assert_eq!(standby_warnings("s:5432", &standby(), &primary()), []);
    }

    #[test]
    fn a_lone_primary_with_defaults_is_told_to_set_synchronized_standby_slots() {
        let lone = HaReading {
            synchronized_standby_slots: Some(String::new()),
            physical_slots: Vec::new(),
            ..primary()
        };
        let warnings = primary_warnings(&lone);
        assert_eq!(warnings.len(), 1);
        let text = warnings[0].to_string();
        assert!(
            text.starts_with("synchronized_standby_slots is not set on the primary")
                && text.contains("there is no physical slot yet"),
            "{text}"
        );
        let with_slots = HaReading {
            synchronized_standby_slots: Some(String::new()),
            physical_slots: vec!["a".into(), "b".into()],
            ..primary()
        };
        assert!(primary_warnings(&with_slots)[0]
            .to_string()
            .contains("physical slots here: a, b"));
        let unknown = HaReading {
            synchronized_standby_slots: Some("standby1, \"gone\"".into()),
            ..primary()
        };
        assert_eq!(
            primary_warnings(&unknown),
            [HaWarning::UnknownStandbySlot {
                slot: "gone".into()
            }]
        );
    }

    #[test]
    fn each_missing_standby_setting_is_named() {
        let bare = HaReading {
            wal_level: "replica".into(),
            sync_replication_slots: Some("off".into()),
            hot_standby_feedback: "off".into(),
            primary_slot_name: String::new(),
            ..standby()
        };
        let texts: Vec<String> = standby_warnings("s:5432", &bare, &primary())
            .iter()
            .map(ToString::to_string)
            .collect();
        let wanted = [
            "wal_level = logical",
            "set sync_replication_slots = on",
            "set hot_standby_feedback = on",
            "primary_slot_name is not set",
        ];
        assert_eq!(texts.len(), wanted.len(), "{texts:?}");
        for (text, needle) in texts.iter().zip(wanted) {
            assert!(
                text.starts_with("standby s:5432: ") && text.contains(needle),
                "{needle}: {text}"
            );
        }
        let elsewhere = HaReading {
            primary_slot_name: "standby2".into(),
            ..standby()
        };
        assert_eq!(
            standby_warnings("s:5432", &elsewhere, &primary()),
            [HaWarning::PrimarySlotMissing {
                host: "s:5432".into(),
                slot: "standby2".into()
            }]
        );
        let unlisted = HaReading {
            physical_slots: vec!["standby1".into(), "standby2".into()],
            ..primary()
        };
        assert_eq!(
            standby_warnings("s:5432", &elsewhere, &unlisted),
            [HaWarning::NotSynchronized {
                host: "s:5432".into(),
                slot: "standby2".into(),
                listed: "standby1".into()
            }]
        );
    }

    #[test]
    fn before_17_there_are_no_failover_slots_and_the_guard_protects() {
        let old = HaReading {
            version_num: 150_018,
            version: "15.18".into(),
            sync_replication_slots: None,
            synchronized_standby_slots: None,
            ..primary()
        };
        let line = too_old(&old).expect("15 has no failover slots");
        assert!(
            line.starts_with("failover slots need PostgreSQL 17 (server 15.18)")
                && line.contains("lost-slot guard"),
            "{line}"
        );
    }
}
