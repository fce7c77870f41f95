//! Readable tables of the lock table and the sessions, for `locksmith locks` and
//! `locksmith sessions`. Pure functions of what the server answered. Keys and names come from
//! other clients, so every control character in them is escaped.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::escape_controls;
use crate::client::{LockTableView, SessionView};

/// How many characters of a session id identify it in a table (`kill` accepts such a prefix).
const SHORT_ID: usize = 8;

/// `locks` as a table: one line per holder and per waiter (in queue order), then the waits-for
/// edges. `sessions` supplies the peer address of each session.
pub fn locks_table(view: &LockTableView, sessions: &[SessionView]) -> String {
    let peers: HashMap<&str, &str> = sessions
        .iter()
        .map(|s| (s.session.as_str(), s.peer.as_str()))
        .collect();
    let names: HashMap<&str, &str> = sessions
        .iter()
        .filter_map(|s| Some((s.session.as_str(), s.name.as_deref()?)))
        .collect();
    let who = |session: &str, name: Option<&str>| {
        let name = name.or_else(|| names.get(session).copied());
        describe_session(session, name, peers.get(session).copied())
    };
    let mut rows = vec![row(["KEY", "STATE", "MODE", "SESSION", "FOR"])];
    for key in &view.locks {
        let mut first = true;
        let mut key_cell = || {
            let cell = if first {
                key.key.clone()
            } else {
                String::new()
            };
            first = false;
            cell
        };
        for holder in &key.holders {
            rows.push(vec![
                key_cell(),
                "held".into(),
                holder.mode.clone(),
                who(&holder.session, holder.name.as_deref()),
                holder
                    .held_ms
                    .map_or_else(|| "-".into(), |ms| human(Duration::from_millis(ms))),
            ]);
        }
        for waiter in &key.waiters {
            let state = if waiter.upgrade {
                "upgrading"
            } else {
                "waiting"
            };
            rows.push(vec![
                key_cell(),
                state.into(),
                waiter.mode.clone(),
                who(&waiter.session, waiter.name.as_deref()),
                human(Duration::from_millis(waiter.waiting_ms)),
            ]);
        }
    }
    let mut out = if view.locks.is_empty() {
        "no locks held or waited for\n".to_owned()
    } else {
        align(&rows)
    };
    if view.more > 0 {
        let _ = writeln!(
            out,
            "... and {} more keys (narrow with PREFIX or raise --limit)",
            view.more
        );
    }
    if !view.waits_for.is_empty() {
        out.push_str("\nWAITS FOR\n");
        for edge in &view.waits_for {
            let _ = writeln!(
                out,
                "{} -> {}",
                short_who(&edge.waiter, names.get(edge.waiter.as_str()).copied()),
                short_who(&edge.waits_for, names.get(edge.waits_for.as_str()).copied())
            );
        }
        if view.waits_for_more > 0 {
            let _ = writeln!(out, "... and {} more edges", view.waits_for_more);
        }
    }
    let _ = writeln!(out, "\n{} sessions open", view.sessions);
    out
}

/// `sessions` as a table.
pub fn sessions_table(sessions: &[SessionView]) -> String {
    if sessions.is_empty() {
        return "no sessions open\n".into();
    }
    let mut rows = vec![row([
        "SESSION",
        "NAME",
        "PEER",
        "CONNECTED",
        "HELD",
        "WAITING FOR",
    ])];
    for session in sessions {
        rows.push(vec![
            short(&session.session).to_owned(),
            session.name.clone().unwrap_or_else(|| "-".into()),
            session.peer.clone(),
            human(Duration::from_millis(session.connected_ms)),
            session.held.to_string(),
            session.waiting_for.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    align(&rows)
}

/// `name (peer, 5f2e1c3a)`, or `5f2e1c3a (peer)` for a session without a name.
fn describe_session(session: &str, name: Option<&str>, peer: Option<&str>) -> String {
    match (name, peer) {
        (Some(name), Some(peer)) => format!("{name} ({peer}, {})", short(session)),
        (Some(name), None) => format!("{name} ({})", short(session)),
        (None, Some(peer)) => format!("{} ({peer})", short(session)),
        (None, None) => short(session).to_owned(),
    }
}

/// `name (5f2e1c3a)`, or `5f2e1c3a`, for a waits-for line (the name escaped: it is no table cell).
fn short_who(session: &str, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("{} ({})", escape_controls(name), short(session)),
        None => short(session).to_owned(),
    }
}

fn short(session: &str) -> &str {
    session.get(..SHORT_ID).unwrap_or(session)
}

/// A duration the way a person reads it: `250ms`, `12.3s`, `4m05s`, `2h03m`.
pub fn human(duration: Duration) -> String {
    let ms = duration.as_millis();
    let s = duration.as_secs();
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{:.1}s", duration.as_secs_f64())
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// Left-aligned columns, two spaces apart, no trailing spaces. Every cell is escaped
/// ([`escape_controls`]) first: keys and names come from other clients.
fn align(rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|cell| escape_controls(cell).into_owned())
                .collect()
        })
        .collect();
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{HolderView, KeyView, WaiterView, WaitsForEdge};

    fn session(id: &str, name: Option<&str>, peer: &str) -> SessionView {
        SessionView {
            session: id.into(),
            name: name.map(Into::into),
            peer: peer.into(),
            connected_ms: 62_000,
            held: 1,
            waiting_for: None,
        }
    }

    #[test]
    fn the_locks_table_shows_holder_name_peer_id_and_time_then_waiters_in_order_and_edges() {
        let a = "5f2e1c3a-0000-0000-0000-000000000000";
        let b = "0b6b0f0e-0000-0000-0000-000000000000";
        let view = LockTableView {
            locks: vec![KeyView {
                key: "job/a".into(),
                holders: vec![HolderView {
                    session: a.into(),
                    name: Some("backup".into()),
                    mode: "write".into(),
                    token: 7,
                    held_ms: Some(12_300),
                }],
                waiters: vec![WaiterView {
                    session: b.into(),
                    name: None,
                    mode: "read".into(),
                    upgrade: false,
                    waiting_ms: 250,
                }],
            }],
            waits_for: vec![WaitsForEdge {
                waiter: b.into(),
                waits_for: a.into(),
            }],
            sessions: 2,
            ..LockTableView::default()
        };
        let sessions = [
            session(a, Some("backup"), "127.0.0.1:5000"),
            session(b, None, "[::1]:6000"),
        ];
        let table = locks_table(&view, &sessions);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "KEY    STATE    MODE   SESSION                            FOR"
        );
        assert_eq!(
            lines[1],
            "job/a  held     write  backup (127.0.0.1:5000, 5f2e1c3a)  12.3s"
        );
        assert_eq!(
            lines[2],
            "       waiting  read   0b6b0f0e ([::1]:6000)              250ms"
        );
        assert_eq!(lines[4], "WAITS FOR");
        assert_eq!(lines[5], "0b6b0f0e -> backup (5f2e1c3a)");
        assert_eq!(lines[7], "2 sessions open");
    }

    #[test]
    fn the_sessions_table_has_one_line_per_session() {
        let table = sessions_table(&[session("5f2e1c3a-0000", Some("backup"), "127.0.0.1:5000")]);
        assert_eq!(
            table,
            "SESSION   NAME    PEER            CONNECTED  HELD  WAITING FOR\n\
             5f2e1c3a  backup  127.0.0.1:5000  1m02s      1     -\n"
        );
    }

    #[test]
    fn control_characters_in_keys_and_names_are_escaped_in_every_table_cell() {
        let a = "5f2e1c3a-0000-0000-0000-000000000000";
        let b = "0b6b0f0e-0000-0000-0000-000000000000";
        let view = LockTableView {
            locks: vec![KeyView {
                key: "k\u{1b}[2J".into(),
                holders: vec![HolderView {
                    session: a.into(),
                    name: Some("n\u{1b}]0;x\u{7}".into()),
                    mode: "write".into(),
                    token: 7,
                    held_ms: Some(10),
                }],
                waiters: vec![WaiterView {
                    session: b.into(),
                    name: Some("w\r".into()),
                    mode: "read".into(),
                    upgrade: false,
                    waiting_ms: 10,
                }],
            }],
            waits_for: vec![WaitsForEdge {
                waiter: b.into(),
                waits_for: a.into(),
            }],
            sessions: 2,
            ..LockTableView::default()
        };
        let mut waiting = session(b, Some("w\r"), "[::1]:6000");
        waiting.waiting_for = Some("k\u{1b}[2J".into());
        let sessions = [
            session(a, Some("n\u{1b}]0;x\u{7}"), "127.0.0.1:5000"),
            waiting,
        ];
        for table in [locks_table(&view, &sessions), sessions_table(&sessions)] {
            assert!(
                !table.chars().any(|c| c.is_control() && c != '\n'),
                "{table:?}"
            );
        }
        let locks = locks_table(&view, &sessions);
        assert!(locks.contains("k\\u{1b}[2J  held"), "{locks}");
        assert!(
            locks.contains("n\\u{1b}]0;x\\u{7} (127.0.0.1:5000"),
            "{locks}"
        );
        assert!(
            locks.contains("w\\r (0b6b0f0e) -> n\\u{1b}]0;x\\u{7} (5f2e1c3a)"),
            "{locks}"
        );
        let table = sessions_table(&sessions);
        assert!(table.contains("w\\r"), "{table}");
        assert!(table.trim_end().ends_with("k\\u{1b}[2J"), "{table}");
    }

    #[test]
    fn durations_read_as_a_person_would_say_them() {
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_millis(12_345)), "12.3s");
        assert_eq!(human(Duration::from_secs(245)), "4m05s");
        assert_eq!(human(Duration::from_secs(7380)), "2h03m");
    }
}
