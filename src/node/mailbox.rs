//! A single-slot mailbox between the ROS callback (producer) and the detector thread
//! (consumer): the newest item always wins. A slow frame therefore never builds a queue;
//! an item replaced before the consumer took it is dropped and counted, so latency stays
//! bounded by one processing time and drops are reported instead of hidden.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

#[derive(Debug, Default)]
struct Slot<T> {
    item: Option<T>,
    closed: bool,
    received: u64,
    dropped: u64,
}

/// Counters of a mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MailboxCounts {
    /// Items put.
    pub received: u64,
    /// Items replaced by a newer one before they were taken.
    pub dropped: u64,
}

/// The newest-wins slot.
#[derive(Debug, Default)]
pub struct Mailbox<T> {
    slot: Mutex<Slot<T>>,
    ready: Condvar,
}

impl<T> Mailbox<T> {
    pub fn new() -> Self {
        Self {
            slot: Mutex::new(Slot {
                item: None,
                closed: false,
                received: 0,
                dropped: 0,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slot<T>> {
        // A panic while holding this lock cannot leave the slot inconsistent (every
        // update is a single assignment), so a poisoned lock is still usable.
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `item`, replacing (and dropping) an item not yet taken. Returns whether one
    /// was replaced. After `close`, the item is discarded.
    pub fn put(&self, item: T) -> bool {
        let mut s = self.lock();
        if s.closed {
            return false;
        }
        s.received += 1;
        let replaced = s.item.replace(item).is_some();
        if replaced {
            s.dropped += 1;
        }
        drop(s);
        self.ready.notify_one();
        replaced
    }

    /// Takes the item, waiting up to `timeout` for one. `None` on timeout or when the
    /// mailbox is closed and empty.
    pub fn take_timeout(&self, timeout: Duration) -> Option<T> {
        let s = self.lock();
        let (mut s, _) = self
            .ready
            .wait_timeout_while(s, timeout, |s| s.item.is_none() && !s.closed)
            .unwrap_or_else(|e| e.into_inner());
        s.item.take()
    }

    /// Takes the item without waiting.
    pub fn try_take(&self) -> Option<T> {
        self.lock().item.take()
    }

    /// Stops accepting items and wakes the consumer.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    pub fn counts(&self) -> MailboxCounts {
        let s = self.lock();
        MailboxCounts {
            received: s.received,
            dropped: s.dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn newest_wins_and_drops_are_counted() {
        let m = Mailbox::new();
        assert!(!m.put(1));
        assert!(m.put(2));
        assert!(m.put(3));
        assert_eq!(m.try_take(), Some(3));
        assert_eq!(m.try_take(), None);
        assert!(!m.put(4));
        assert_eq!(m.take_timeout(Duration::from_millis(1)), Some(4));
        assert_eq!(
            m.counts(),
            MailboxCounts {
                received: 4,
                dropped: 2
            }
        );
    }

    #[test]
    fn consumer_wakes_on_put_and_on_close() {
        let m = Arc::new(Mailbox::new());
        let c = m.clone();
        let consumer = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(v) = c.take_timeout(Duration::from_secs(10)) {
                got.push(v);
            }
            got
        });
        // A slow consumer sees a subsequence of what was put, in order, ending with the
        // newest item; everything else is counted as dropped.
        for i in 0..1000 {
            m.put(i);
        }
        // Wait for the consumer to take the last item before closing.
        let t0 = Instant::now();
        while m.lock().item.is_some() && t0.elapsed() < Duration::from_secs(10) {
            std::thread::yield_now();
        }
        m.close();
        let got = consumer.join().unwrap();
        assert_eq!(*got.last().unwrap(), 999);
        assert!(got.windows(2).all(|w| w[0] < w[1]));
        let c = m.counts();
        assert_eq!(c.received, 1000);
        assert_eq!(c.dropped as usize, 1000 - got.len());
        assert!(!m.put(5), "closed mailboxes discard");
        assert_eq!(m.try_take(), None);
        assert_eq!(m.counts().received, 1000);
    }

    #[test]
    fn take_times_out_when_empty() {
        let m: Mailbox<u8> = Mailbox::new();
        let t0 = Instant::now();
        assert_eq!(m.take_timeout(Duration::from_millis(20)), None);
        assert!(t0.elapsed() >= Duration::from_millis(20));
    }
}
