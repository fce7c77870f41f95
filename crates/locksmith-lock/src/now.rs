//! The time of a call. The table has no clock: a call either gets its time, or gets the caller's
//! clock and reads it only if it needs the time (to stamp a waiter's `since`), so calls that never
//! queue anything never read a clock.

use std::time::Instant;

/// The time of one call: given, or read from the caller's clock on first use.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// The time, once known.
    reading: Option<Instant>,
    /// Where to read it from if it is not known yet.
    clock: fn() -> Instant,
}

impl Now {
    /// A time read from `clock` the first time the call needs one.
    pub fn lazy(clock: fn() -> Instant) -> Self {
        Now {
            reading: None,
            clock,
        }
    }

    /// The time of the call (reading the clock now if it was not read yet).
    pub(crate) fn get(&mut self) -> Instant {
        *self.reading.get_or_insert_with(self.clock)
    }
}

impl From<Instant> for Now {
    fn from(instant: Instant) -> Self {
        Now {
            reading: Some(instant),
            clock: Instant::now,
        }
    }
}
