//! The line of a dotted key (`workers.count`) in the fleet file, from a YAML parser's event
//! positions, so block and flow style (`balancer: {load_factor: 0.5}`) are both found.

use std::str::Chars;

use yaml_rust2::Event;
use yaml_rust2::parser::Parser;

/// Find the 1-based line of a dotted key, e.g. `workers.count`: the line of the key itself,
/// not of its value.
///
/// serde_yaml keeps no positions once a value has parsed; this re-reads the text with
/// `yaml-rust2`, whose events carry them. `None` when the key is absent or the text does not
/// parse. Keys are plain names: a dotted key cannot reach into lists (`upstreams[1]`).
pub fn locate_key(text: &str, dotted: &str) -> Option<usize> {
    let mut events = Events(Parser::new_from_str(text));
    // The key path applies to the first document's root node.
    while !matches!(events.next()?.0, Event::DocumentStart) {}
    let path: Vec<&str> = dotted.split('.').collect();
    find_in_node(&mut events, &path)
}

/// The parser's events with their 1-based lines; a scan error ends the stream.
struct Events<'a>(Parser<Chars<'a>>);

impl Events<'_> {
    fn next(&mut self) -> Option<(Event, usize)> {
        match self.0.next_token() {
            Ok((Event::StreamEnd, _)) | Err(_) => None,
            Ok((event, mark)) => Some((event, mark.line())),
        }
    }
}

/// Reads one node; returns the line of `path` inside it. Stops reading once found, so what is
/// left unread does not matter.
fn find_in_node(events: &mut Events, path: &[&str]) -> Option<usize> {
    let (want, rest) = path.split_first()?;
    let (first, _) = events.next()?;
    if !matches!(first, Event::MappingStart(..)) {
        return None; // a scalar, list or alias: no keys below it
    }
    loop {
        let (key, line) = events.next()?;
        match key {
            Event::MappingEnd => return None,
            Event::Scalar(ref name, ..) if name == want => {
                return if rest.is_empty() {
                    Some(line)
                } else {
                    find_in_node(events, rest)
                };
            }
            // Some other key, possibly a complex one (`? [a, b]`): skip it, then its value.
            other => skip_node(events, other)?,
        }
        let (value, _) = events.next()?;
        skip_node(events, value)?;
    }
}

/// Reads the rest of the node that `first` opened.
fn skip_node(events: &mut Events, first: Event) -> Option<()> {
    let mut depth = 0usize;
    let mut event = first;
    loop {
        match event {
            Event::MappingStart(..) | Event::SequenceStart(..) => depth += 1,
            Event::MappingEnd | Event::SequenceEnd => depth -= 1,
            _ => {}
        }
        if depth == 0 {
            return Some(());
        }
        event = events.next()?.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_key_respects_nesting() {
        let text = "a:\n  x: 1\nb:\n  # c\n  x: 2\n";
        assert_eq!(locate_key(text, "b.x"), Some(5));
        assert_eq!(locate_key(text, "a.x"), Some(2));
        assert_eq!(locate_key(text, "a.y"), None);
    }

    #[test]
    fn flow_style_maps_have_lines() {
        let text = "listen: 0.0.0.0:1\nbalancer: {placement: random, load_factor: 0.5}\n";
        assert_eq!(locate_key(text, "balancer.load_factor"), Some(2));
        let text = "workers: {\n  count: 0,\n  host: h\n}\n";
        assert_eq!(locate_key(text, "workers.count"), Some(2));
        assert_eq!(locate_key(text, "workers.host"), Some(3));
    }

    #[test]
    fn the_key_line_not_the_value_line() {
        let text = "balancer:\n  trusted_proxies:\n    - 10.0.0.0/8\n  threads:\n    0\n";
        assert_eq!(locate_key(text, "balancer.trusted_proxies"), Some(2));
        assert_eq!(locate_key(text, "balancer.threads"), Some(4));
    }

    #[test]
    fn values_and_lists_are_skipped_not_searched() {
        // `x` inside a list, inside a nested map and as a value do not count as `a.x`.
        let text = "a:\n  l: [{x: 1}]\n  m: {n: {x: 2}}\n  v: x\n  ? [x]\n  : 3\n  x: 4\nx: 5\n";
        assert_eq!(locate_key(text, "a.x"), Some(7));
        assert_eq!(locate_key(text, "x"), Some(8));
        assert_eq!(locate_key(text, "a.l.x"), None);
        assert_eq!(locate_key(text, "a.v.x"), None);
    }

    #[test]
    fn quoted_keys_comments_and_document_marker() {
        let text = "# fleet\n---\n\"workers\":\n  # count below\n  'count': 0 # zero\n";
        assert_eq!(locate_key(text, "workers.count"), Some(5));
    }

    #[test]
    fn unparsable_or_empty_text_has_no_line() {
        assert_eq!(locate_key("", "workers"), None);
        assert_eq!(locate_key("workers: [\n", "workers.count"), None);
        assert_eq!(locate_key("workers: 1\n", "workers.count"), None);
    }
}
