//! Tag selection rules, durations and schedules for container tag cleanups: pure, no I/O.
