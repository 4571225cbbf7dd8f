//! Unit tests of `telemetry`.

use super::*;

/// An output that fails its first `failures` writes after writing `partial` bytes once.
struct Flaky {
    written: std::rc::Rc<std::cell::RefCell<Vec<u8>>>,
    failures: std::rc::Rc<std::cell::Cell<u32>>,
}

impl Write for Flaky {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.failures.get() > 0 {
            self.failures.set(self.failures.get() - 1);
            return Err(std::io::Error::other("disk full"));
        }
        self.written.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

thread_local! {
    static WRITTEN: std::rc::Rc<std::cell::RefCell<Vec<u8>>> = Default::default();
    static FAILURES: std::rc::Rc<std::cell::Cell<u32>> = Default::default();
}

fn flaky() -> Flaky {
    Flaky {
        written: WRITTEN.with(Clone::clone),
        failures: FAILURES.with(Clone::clone),
    }
}

fn written_lines() -> Vec<serde_json::Value> {
    let text = WRITTEN.with(|w| String::from_utf8(w.borrow().clone()).unwrap());
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn a_failed_write_is_counted_and_reported_with_the_records_it_lost() {
    let mut writer = Writer::new(flaky, Arc::new(|_| {}));
    FAILURES.with(|f| f.set(1));
    writer.push(b"{\"n\":1}\n", Kind::Audit(1));
    writer.push(b"{\"n\":2}", Kind::Audit(40));
    writer.push(b"{\"n\":3}\n", Kind::Log);
    writer.write_batch();
    // The aggregated record stood for 40 tokens: all of them are reported lost.
    assert_eq!((writer.audit_lost, writer.log_lost), (41, 1));
    assert_eq!(writer.write_errors, 1);
    // The next batch carries the reports, and once they are out the counts start over.
    writer.push(b"{\"n\":4}\n", Kind::Audit(1));
    writer.push_reports();
    writer.write_batch();
    let lines = written_lines();
    assert_eq!(lines[0]["n"], 4);
    assert_eq!(lines[1]["message"], "audit records lost");
    assert_eq!(lines[1]["target"], "audit");
    assert_eq!(
        (
            lines[1]["dropped"].as_u64(),
            lines[1]["write_errors"].as_u64()
        ),
        (Some(41), Some(1))
    );
    assert_eq!(lines[2]["message"], "log lines lost");
    assert_eq!(lines[2]["dropped"], 1);
    assert_eq!(
        (writer.audit_lost, writer.log_lost, writer.write_errors),
        (0, 0, 0)
    );
}

#[test]
fn an_aggregated_record_the_queue_has_no_room_for_is_counted_as_its_tokens() {
    let (sender, _receiver) = std::sync::mpsc::sync_channel(16);
    let pipeline = Pipeline {
        producers: Producers::none(),
        sender,
        capacity: 16,
        pending: AtomicUsize::new(0),
        writer: std::thread::current(),
        audit_dropped: AtomicU64::new(0),
        log_dropped: AtomicU64::new(0),
        flush_requested: AtomicU64::new(0),
        flush_completed: Mutex::new(0),
        flushed: Condvar::new(),
    };
    for _ in 0..16 {
        pipeline.send(b"{}\n".to_vec(), Kind::Audit(1));
    }
    pipeline.send(b"{}\n".to_vec(), Kind::Audit(250));
    pipeline.send(b"{}\n".to_vec(), Kind::Log);
    assert_eq!(pipeline.audit_dropped.load(Ordering::Relaxed), 250);
    assert_eq!(pipeline.log_dropped.load(Ordering::Relaxed), 1);
}

#[test]
fn a_report_that_cannot_be_written_keeps_its_counts() {
    let mut writer = Writer::new(flaky, Arc::new(|_| {}));
    writer.audit_lost = 3;
    FAILURES.with(|f| f.set(1));
    writer.push_reports();
    writer.write_batch();
    assert_eq!((writer.audit_lost, writer.write_errors), (3, 1));
    writer.push_reports();
    writer.write_batch();
    let lines = written_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(
        (
            lines[0]["dropped"].as_u64(),
            lines[0]["write_errors"].as_u64()
        ),
        (Some(3), Some(1))
    );
}
