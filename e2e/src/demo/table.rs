//! A plain-text table whose cells wrap at word boundaries, so a row of
//! evidence (SPIFFE ids, metric series) stays readable in a terminal.

/// A column: its heading and the widest its text may run before wrapping.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    pub heading: &'static str,
    pub width: usize,
}

/// Renders `rows` under `columns`, two spaces between columns, a rule under
/// the headings and a blank line between rows.
pub fn render(columns: &[Column], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let longest = rows
                .iter()
                .filter_map(|r| r.get(i))
                .flat_map(|cell| wrap(cell, c.width))
                .map(|l| l.chars().count())
                .max()
                .unwrap_or(0);
            longest.max(c.heading.len())
        })
        .collect();
    let mut out = String::new();
    let line = |cells: &[String]| -> String {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        text.join("  ").trim_end().to_string() + "\n"
    };
    let headings: Vec<String> = columns.iter().map(|c| c.heading.to_string()).collect();
    out.push_str(&line(&headings));
    let rules: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&line(&rules));
    for (r, row) in rows.iter().enumerate() {
        if r > 0 {
            out.push('\n');
        }
        let wrapped: Vec<Vec<String>> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| wrap(row.get(i).map(String::as_str).unwrap_or(""), c.width))
            .collect();
        let height = wrapped.iter().map(Vec::len).max().unwrap_or(1);
        for l in 0..height {
            let cells: Vec<String> = wrapped
                .iter()
                .map(|lines| lines.get(l).cloned().unwrap_or_default())
                .collect();
            out.push_str(&line(&cells));
        }
    }
    out
}

/// Splits `text` into lines of at most `width` characters, breaking at
/// spaces; a word longer than `width` is cut. Explicit newlines are kept.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines = Vec::new();
    for paragraph in text.split('\n') {
        let mut current = String::new();
        for word in paragraph.split_whitespace() {
            let mut word: Vec<char> = word.chars().collect();
            while word.len() > width {
                if !current.is_empty() {
                    lines.push(std::mem::take(&mut current));
                }
                lines.push(word.drain(..width).collect());
            }
            let word: String = word.into_iter().collect();
            let needed = if current.is_empty() {
                word.chars().count()
            } else {
                current.chars().count() + 1 + word.chars().count()
            };
            if needed > width && !current.is_empty() {
                lines.push(std::mem::take(&mut current));
            }
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(&word);
        }
        lines.push(current);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_wrap_and_long_words_are_cut() {
        assert_eq!(wrap("one two three", 7), vec!["one two", "three"]);
        assert_eq!(wrap("abcdefghij", 4), vec!["abcd", "efgh", "ij"]);
        assert_eq!(wrap("a\nb", 10), vec!["a", "b"]);
        assert_eq!(wrap("", 10), vec![""]);
    }

    #[test]
    fn rows_line_up_under_their_headings() {
        let columns = [
            Column {
                heading: "CHECK",
                width: 10,
            },
            Column {
                heading: "RESULT",
                width: 6,
            },
        ];
        let text = render(
            &columns,
            &[
                vec!["same node, mTLS".into(), "PASS".into()],
                vec!["x".into(), "FAIL".into()],
            ],
        );
        assert_eq!(
            text,
            "CHECK       RESULT\n----------  ------\nsame node,  PASS\nmTLS\n\nx           FAIL\n"
        );
    }
}
