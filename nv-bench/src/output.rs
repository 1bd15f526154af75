//! What a run leaves behind: CSV tables and the printed summary (every ratio the run claims),
//! both under the output directory, so the docs can quote them unedited.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{BenchError, Result};

/// A CSV table built row by row.
pub struct CsvTable {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl CsvTable {
    pub fn new(header: &[&'static str]) -> Self {
        Self {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; it must have one value per column.
    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.header.len(), "CSV row width");
        self.rows.push(row);
    }

    /// The table as CSV text (RFC 4180 quoting where a value needs it).
    pub fn to_csv(&self) -> String {
        let mut text = self.header.join(",");
        text.push('\n');
        for row in &self.rows {
            let cells: Vec<String> = row.iter().map(|cell| quote(cell)).collect();
            text.push_str(&cells.join(","));
            text.push('\n');
        }
        text
    }

    /// The table as a Markdown table (for `results.md`).
    pub fn to_markdown(&self) -> String {
        let escape = |cell: &str| cell.replace('|', "\\|");
        let mut text = format!("| {} |\n", self.header.join(" | "));
        text.push_str(&format!("|{}\n", "---|".repeat(self.header.len())));
        for row in &self.rows {
            let cells: Vec<String> = row.iter().map(|cell| escape(cell)).collect();
            text.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        text
    }

    /// Writes the table to `dir/name` and returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, self.to_csv())
            .map_err(|e| BenchError::io(format!("writing {}", path.display()), e))?;
        Ok(path)
    }
}

fn quote(cell: &str) -> String {
    if cell.contains([',', '"', '\n']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_string()
    }
}

/// Formats a number of seconds with a precision that suits its size.
pub fn seconds(value: f64) -> String {
    format!("{value:.6}")
}

/// The run's printed summary: each line goes to stdout as it is produced and is kept for
/// `summary.txt`; summary tables go to `results.md`.
#[derive(Default)]
pub struct Summary {
    text: String,
    markdown: String,
}

impl Summary {
    /// Prints and records one line.
    pub fn line(&mut self, line: impl AsRef<str>) {
        println!("{}", line.as_ref());
        let _ = writeln!(self.text, "{}", line.as_ref());
    }

    /// Tells the operator what is running now (stderr; not part of the results).
    pub fn progress(&self, what: impl AsRef<str>) {
        eprintln!("nv-bench: {}", what.as_ref());
    }

    /// Prints and records a measurement that could not be made, with the reason.
    pub fn not_measured(&mut self, what: &str, why: &str) {
        // Keep the reason on one line: it may carry multi-line VMM output.
        let first_lines: Vec<&str> = why.lines().take(6).collect();
        self.line(format!("NOT MEASURED {what}: {}", first_lines.join(" | ")));
    }

    /// Records a summary table for `results.md` under `title`.
    pub fn table(&mut self, title: &str, table: &CsvTable) {
        let _ = write!(self.markdown, "### {title}\n\n{}\n", table.to_markdown());
    }

    /// Writes `summary.txt` (the printed lines) and `results.md` (the summary tables).
    pub fn write(&self, dir: &Path) -> Result<()> {
        for (name, text) in [("summary.txt", &self.text), ("results.md", &self.markdown)] {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| BenchError::io(format!("writing {}", path.display()), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_what_needs_it() {
        let mut table = CsvTable::new(&["a", "b"]);
        table.push(vec!["1".into(), "x,y".into()]);
        table.push(vec!["say \"hi\"".into(), "2".into()]);
        assert_eq!(table.to_csv(), "a,b\n1,\"x,y\"\n\"say \"\"hi\"\"\",2\n");
        assert_eq!(
            table.to_markdown(),
            "| a | b |\n|---|---|\n| 1 | x,y |\n| say \"hi\" | 2 |\n"
        );
    }
}
