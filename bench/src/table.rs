//! Markdown tables with padded columns, readable both raw in a terminal and rendered.
//!
//! The first column is a label and left-aligned; every other column holds figures and is
//! right-aligned. Pipes inside cells are escaped so a cell can never split a row.

/// A table under construction.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with the given column headings.
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Self {
        Self { header: header.into_iter().map(Into::into).collect(), rows: Vec::new() }
    }

    /// Appends a row; missing cells render empty, extra cells are dropped.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) -> &mut Self {
        let mut row: Vec<String> = cells.into_iter().map(Into::into).collect();
        row.resize(self.header.len(), String::new());
        self.rows.push(row);
        self
    }

    /// The table as markdown, one line per row, ending with a newline.
    pub fn render(&self) -> String {
        let header: Vec<String> = self.header.iter().map(|c| escape(c)).collect();
        let rows: Vec<Vec<String>> =
            self.rows.iter().map(|r| r.iter().map(|c| escape(c)).collect()).collect();
        let widths = column_widths(&header, &rows);
        let mut out = render_line(&header, &widths);
        out.push_str(&rule(&widths));
        for row in &rows {
            out.push_str(&render_line(row, &widths));
        }
        out
    }
}

fn escape(cell: &str) -> String {
    cell.replace('|', "\\|").replace('\n', " ")
}

fn column_widths(header: &[String], rows: &[Vec<String>]) -> Vec<usize> {
    let mut widths: Vec<usize> = header.iter().map(|c| c.chars().count().max(3)).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    widths
}

fn render_line(cells: &[String], widths: &[usize]) -> String {
    let padded: Vec<String> = cells
        .iter()
        .zip(widths)
        .enumerate()
        .map(|(i, (cell, &width))| pad(cell, width, i == 0))
        .collect();
    format!("| {} |\n", padded.join(" | "))
}

fn pad(cell: &str, width: usize, left: bool) -> String {
    let fill = " ".repeat(width.saturating_sub(cell.chars().count()));
    if left {
        format!("{cell}{fill}")
    } else {
        format!("{fill}{cell}")
    }
}

fn rule(widths: &[usize]) -> String {
    let marks: Vec<String> = widths
        .iter()
        .enumerate()
        .map(|(i, &w)| if i == 0 { "-".repeat(w) } else { format!("{}:", "-".repeat(w - 1)) })
        .collect();
    format!("| {} |\n", marks.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_aligned_markdown() {
        let mut table = Table::new(["contender", "Gbit/s"]);
        table.row(["haproxy", "12.5"]).row(["direct", "101.25"]);
        let expected = "\
| contender | Gbit/s |
| --------- | -----: |
| haproxy   |   12.5 |
| direct    | 101.25 |
";
        assert_eq!(table.render(), expected);
    }

    #[test]
    fn short_rows_are_padded_and_pipes_escaped() {
        let mut table = Table::new(["a", "b", "c"]);
        table.row(["x|y"]);
        let text = table.render();
        let last = text.lines().last().unwrap();
        assert_eq!(last, "| x\\|y |     |     |");
        assert_eq!(text.lines().count(), 3);
    }

    #[test]
    fn widths_count_characters_not_bytes() {
        let mut table = Table::new(["µs", "n"]);
        table.row(["p99 µs", "1"]);
        let text = table.render();
        let lengths: Vec<usize> = text.lines().map(|l| l.chars().count()).collect();
        assert!(lengths.windows(2).all(|w| w[0] == w[1]), "{text}");
    }
}
