//! When a cleanup runs: a 5-field cron expression (`minute hour day-of-month month
//! day-of-week`, Vixie semantics via the `croner` crate, `@daily`-style nicknames accepted)
//! evaluated in an IANA time zone (jiff's bundled tz database).
//!
//! Daylight saving time follows croner, as cron daemons do: a wall-clock time skipped by a
//! spring-forward gap runs at the first instant after the gap (`30 2 * * *` in Europe/Berlin
//! runs at 03:00 CEST on that day); a wall-clock time repeated by a fall-back runs once, at
//! its first occurrence.
//!
//! A missed slot (operator down, or a slow previous run) runs once, as soon as possible,
//! however many slots were missed; the next run is then the first slot after now.

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::{Error, Result};

pub const FIELD_SCHEDULE: &str = "schedule";
pub const FIELD_TIME_ZONE: &str = "timeZone";

const CRON_FIELDS: [&str; 5] = ["minute", "hour", "day-of-month", "month", "day-of-week"];
/// Missed slots are counted for reporting only; counting stops here.
const MISSED_SLOTS_COUNT_LIMIT: u32 = 1000;

/// A parsed schedule: cron expression plus time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    expression: String,
    time_zone: TimeZone,
    time_zone_name: String,
}

/// Whether a cleanup is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// At least one slot passed since the last run: run now, once.
    Now {
        /// The most recent slot at or before `now`; record it as the last scheduled time.
        slot: Timestamp,
        /// How many slots were missed (1 = just this one), counted up to 1000.
        missed_slots: u32,
        /// The first slot after `now`, for `status.nextRunTime` once this run is done.
        next: Option<Timestamp>,
    },
    /// Nothing to do until `next`.
    At { next: Timestamp },
    /// The expression has no future slot.
    Never,
}

impl Schedule {
    /// Parses a 5-field cron expression and an IANA time zone name (blank means UTC).
    /// Errors name the spec field (`schedule` or `timeZone`), the input and, for cron, which
    /// of the five fields is wrong.
    pub fn parse(cron: &str, time_zone: &str) -> Result<Schedule> {
        let time_zone_name = match time_zone.trim() {
            "" => "UTC",
            name => name,
        };
        let zone = TimeZone::get(time_zone_name).map_err(|error| Error::InvalidSchedule {
            field: FIELD_TIME_ZONE,
            input: time_zone.to_owned(),
            message: format!("not a known IANA time zone (e.g. UTC, Europe/Berlin): {error}"),
        })?;
        let expression = cron.trim();
        let parsed = parse_cron(expression).map_err(|message| Error::InvalidSchedule {
            field: FIELD_SCHEDULE,
            input: cron.to_owned(),
            message,
        })?;
        let schedule = Schedule {
            cron: parsed,
            expression: expression.to_owned(),
            time_zone: zone,
            time_zone_name: time_zone_name.to_owned(),
        };
        // `0 0 31 2 *` parses but never fires; say so now rather than never run.
        if schedule.next_after(Timestamp::UNIX_EPOCH).is_none() {
            return Err(Error::InvalidSchedule {
                field: FIELD_SCHEDULE,
                input: cron.to_owned(),
                message: "never matches any date".to_owned(),
            });
        }
        Ok(schedule)
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    pub fn time_zone(&self) -> &str {
        &self.time_zone_name
    }

    /// The first slot strictly after `after`.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let zoned = after.to_zoned(self.time_zone.clone());
        self.cron
            .find_next_occurrence(&zoned, false)
            .ok()
            .map(|next| next.timestamp())
    }

    /// The last slot at or before `at`.
    fn previous_at_or_before(&self, at: Timestamp) -> Option<Timestamp> {
        let zoned = at.to_zoned(self.time_zone.clone());
        self.cron
            .find_previous_occurrence(&zoned, true)
            .ok()
            .map(|previous| previous.timestamp())
    }

    /// Whether a run is due at `now`.
    ///
    /// `last_scheduled_or_run` is the slot last acted on (or the last run's start); without
    /// one, slots count from `created` (the object's creation), so a new object waits for its
    /// first slot. A `last_scheduled_or_run` in the future (clock skew) counts as `now`.
    pub fn due(
        &self,
        last_scheduled_or_run: Option<Timestamp>,
        created: Timestamp,
        now: Timestamp,
    ) -> Due {
        let since = last_scheduled_or_run.unwrap_or(created).min(now);
        let Some(first_missed) = self.next_after(since) else {
            return Due::Never;
        };
        if first_missed > now {
            return Due::At { next: first_missed };
        }
        let slot = self
            .previous_at_or_before(now)
            .filter(|slot| *slot >= first_missed && *slot <= now)
            .unwrap_or(first_missed);
        let mut missed_slots = 1;
        let mut cursor = first_missed;
        while missed_slots < MISSED_SLOTS_COUNT_LIMIT {
            match self.next_after(cursor) {
                Some(next) if next <= now => {
                    missed_slots += 1;
                    cursor = next;
                }
                _ => break,
            }
        }
        Due::Now {
            slot,
            missed_slots,
            next: self.next_after(now),
        }
    }
}

/// Parses with croner restricted to 5 fields; on failure, finds which field is wrong.
fn parse_cron(expression: &str) -> Result<Cron, String> {
    let parser = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build();
    if expression.is_empty() {
        return Err("empty; expected 5 fields: minute hour day-of-month month day-of-week".into());
    }
    let fields: Vec<&str> = expression.split_whitespace().collect();
    if !expression.starts_with('@') && fields.len() != CRON_FIELDS.len() {
        return Err(format!(
            "expected 5 fields (minute hour day-of-month month day-of-week), found {}",
            fields.len()
        ));
    }
    match parser.parse(expression) {
        Ok(cron) => Ok(cron),
        Err(error) => {
            if fields.len() == CRON_FIELDS.len() {
                for (position, field) in fields.iter().enumerate() {
                    let mut probe = ["*"; 5];
                    probe[position] = field;
                    if parser.parse(&probe.join(" ")).is_err() {
                        return Err(format!(
                            "{} field {field:?} is invalid: {error}",
                            CRON_FIELDS[position]
                        ));
                    }
                }
            }
            Err(error.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn slots(schedule: &Schedule, from: &str, count: usize) -> Vec<String> {
        let mut cursor = at(from);
        let mut found = Vec::new();
        for _ in 0..count {
            cursor = schedule.next_after(cursor).unwrap();
            found.push(cursor.to_string());
        }
        found
    }

    #[test]
    fn daily_utc() {
        let schedule = Schedule::parse("0 3 * * *", "UTC").unwrap();
        assert_eq!(
            slots(&schedule, "2026-01-01T03:00:00Z", 2),
            ["2026-01-02T03:00:00Z", "2026-01-03T03:00:00Z"]
        );
        assert_eq!(schedule.expression(), "0 3 * * *");
        assert_eq!(schedule.time_zone(), "UTC");
        let blank_zone = Schedule::parse("@daily", "").unwrap();
        assert_eq!(
            blank_zone.next_after(at("2026-01-01T10:00:00Z")),
            Some(at("2026-01-02T00:00:00Z"))
        );
    }

    #[test]
    fn berlin_spring_forward_runs_once_after_the_gap() {
        // 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that day.
        let schedule = Schedule::parse("30 2 * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            slots(&schedule, "2026-03-27T12:00:00Z", 4),
            [
                "2026-03-28T01:30:00Z", // 02:30 CET
                "2026-03-29T01:00:00Z", // 03:00 CEST, first instant after the gap
                "2026-03-30T00:30:00Z", // 02:30 CEST
                "2026-03-31T00:30:00Z",
            ]
        );
    }

    #[test]
    fn berlin_fall_back_runs_once_at_the_first_occurrence() {
        // 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
        let schedule = Schedule::parse("30 2 * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            slots(&schedule, "2026-10-23T12:00:00Z", 3),
            [
                "2026-10-24T00:30:00Z", // 02:30 CEST
                "2026-10-25T00:30:00Z", // first 02:30 (CEST); not again at 01:30Z
                "2026-10-26T01:30:00Z", // 02:30 CET
            ]
        );
    }

    #[test]
    fn hourly_across_fall_back_keeps_every_real_hour() {
        let schedule = Schedule::parse("0 * * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            slots(&schedule, "2026-10-24T23:30:00Z", 4),
            [
                "2026-10-25T00:00:00Z",
                "2026-10-25T01:00:00Z",
                "2026-10-25T02:00:00Z",
                "2026-10-25T03:00:00Z",
            ]
        );
    }

    #[test]
    fn several_missed_slots_make_one_run_now() {
        let schedule = Schedule::parse("0 3 * * *", "UTC").unwrap();
        let created = at("2026-01-01T00:00:00Z");
        let last = at("2026-01-02T03:00:00Z");
        let now = at("2026-01-05T10:00:00Z"); // slots on the 3rd, 4th and 5th were missed
        assert_eq!(
            schedule.due(Some(last), created, now),
            Due::Now {
                slot: at("2026-01-05T03:00:00Z"),
                missed_slots: 3,
                next: Some(at("2026-01-06T03:00:00Z")),
            }
        );
        // After running, the slot acted on is recorded: nothing more until the next slot.
        assert_eq!(
            schedule.due(Some(at("2026-01-05T03:00:00Z")), created, now),
            Due::At {
                next: at("2026-01-06T03:00:00Z")
            }
        );
        // Recording the run's own start time works the same.
        assert_eq!(
            schedule.due(Some(now), created, now),
            Due::At {
                next: at("2026-01-06T03:00:00Z")
            }
        );
    }

    #[test]
    fn due_from_creation_and_exactly_on_the_slot() {
        let schedule = Schedule::parse("0 3 * * *", "UTC").unwrap();
        let created = at("2026-01-01T05:00:00Z");
        assert_eq!(
            schedule.due(None, created, at("2026-01-01T06:00:00Z")),
            Due::At {
                next: at("2026-01-02T03:00:00Z")
            }
        );
        let on_slot = at("2026-01-02T03:00:00Z");
        assert_eq!(
            schedule.due(None, created, on_slot),
            Due::Now {
                slot: on_slot,
                missed_slots: 1,
                next: Some(at("2026-01-03T03:00:00Z"))
            }
        );
        // A last run recorded in the future (clock skew) does not block forever.
        assert_eq!(
            schedule.due(
                Some(at("2030-01-01T00:00:00Z")),
                created,
                at("2026-01-01T06:00:00Z")
            ),
            Due::At {
                next: at("2026-01-02T03:00:00Z")
            }
        );
    }

    #[test]
    fn missed_slot_count_is_capped() {
        let schedule = Schedule::parse("* * * * *", "UTC").unwrap();
        match schedule.due(
            Some(at("2026-01-01T00:00:00Z")),
            at("2025-01-01T00:00:00Z"),
            at("2026-01-10T00:00:00Z"),
        ) {
            Due::Now {
                missed_slots, slot, ..
            } => {
                assert_eq!(missed_slots, MISSED_SLOTS_COUNT_LIMIT);
                assert_eq!(slot, at("2026-01-10T00:00:00Z"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn errors_name_field_and_input() {
        let cases = [
            ("61 3 * * *", "UTC", "minute field \"61\""),
            ("0 25 * * *", "UTC", "hour field \"25\""),
            ("0 3 * 13 *", "UTC", "month field \"13\""),
            ("0 3 * * 9", "UTC", "day-of-week field \"9\""),
            ("0 3 * *", "UTC", "expected 5 fields"),
            ("0 0 3 * * *", "UTC", "expected 5 fields"),
            ("", "UTC", "empty"),
            ("0 0 31 2 *", "UTC", "never matches"),
        ];
        for (cron, zone, expected) in cases {
            let error = Schedule::parse(cron, zone).expect_err(cron);
            let message = error.to_string();
            assert!(
                message.starts_with(&format!("schedule {cron:?}")),
                "{message}"
            );
            assert!(message.contains(expected), "{message}");
            assert_eq!(error.reason(), "InvalidSpec");
        }
        let zone = Schedule::parse("0 3 * * *", "Mars/Olympus_Mons")
            .unwrap_err()
            .to_string();
        assert!(zone.starts_with("timeZone \"Mars/Olympus_Mons\""), "{zone}");
    }
}
