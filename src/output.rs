//! The one place that writes command output to stdout: tables, JSON and CSV.
#![allow(clippy::print_stdout)]

use serde::Serialize;

/// Output formats for listing commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

/// Output formats for commands that show one thing (a deal, a dead letter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ViewFormat {
    Table,
    Json,
}

/// Rows of text cells under a header, rendered as a table, JSON objects or CSV.
pub struct Rows {
    pub headers: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Rows {
    pub fn new(headers: Vec<&'static str>) -> Self {
        Rows {
            headers,
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Table => self.table(),
            Format::Csv => self.csv(),
            Format::Json => {
                let objects: Vec<serde_json::Map<String, serde_json::Value>> = self
                    .rows
                    .iter()
                    .map(|row| {
                        self.headers
                            .iter()
                            .zip(row)
                            .map(|(h, v)| ((*h).to_owned(), serde_json::Value::String(v.clone())))
                            .collect()
                    })
                    .collect();
                to_json(&objects)
            }
        }
    }

    fn table(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut out = String::new();
            for (at, (cell, width)) in cells.iter().zip(&widths).enumerate() {
                if at > 0 {
                    out.push_str("  ");
                }
                out.push_str(cell);
                if at + 1 < cells.len() {
                    out.push_str(&" ".repeat(width - cell.chars().count()));
                }
            }
            out.trim_end().to_owned() + "\n"
        };
        let mut out = line(self.headers.clone());
        for row in &self.rows {
            out.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        out
    }

    fn csv(&self) -> String {
        let mut out = String::new();
        let mut write_row = |cells: Vec<&str>| {
            let quoted: Vec<String> = cells.iter().map(|cell| csv_cell(cell)).collect();
            out.push_str(&quoted.join(","));
            out.push_str("\r\n");
        };
        write_row(self.headers.clone());
        for row in &self.rows {
            write_row(row.iter().map(String::as_str).collect());
        }
        out
    }
}

/// Quotes a CSV cell as RFC 4180 says; a leading formula character is neutralized so
/// a spreadsheet does not execute a deal title.
fn csv_cell(cell: &str) -> String {
    let cell = if cell.starts_with(['=', '+', '-', '@']) && cell.parse::<f64>().is_err() {
        format!("'{cell}")
    } else {
        cell.to_owned()
    };
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell
    }
}

pub fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".to_owned()) + "\n"
}

/// Writes to stdout.
pub fn print(text: &str) {
    print!("{text}");
}

/// Prints what a list command found: `json` of the items with `--format json`, else a
/// table (or CSV) of `columns` with one `row` per item.
pub fn print_list<T>(
    format: Format,
    items: &[T],
    json: impl FnOnce(&[T]) -> String,
    columns: Vec<&'static str>,
    row: impl Fn(&T) -> Vec<String>,
) {
    if format == Format::Json {
        print(&json(items));
        return;
    }
    let mut rows = Rows::new(columns);
    for item in items {
        rows.push(row(item));
    }
    print(&rows.render(format));
}

/// An instant as a table cell: `YYYY-MM-DD HH:MM:SS`, in UTC.
pub fn time(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("=HYPERLINK()"), "'=HYPERLINK()");
        assert_eq!(csv_cell("-12.5"), "-12.5");
    }

    #[test]
    fn tables_align_columns() {
        let mut rows = Rows::new(vec!["a", "bb"]);
        rows.push(vec!["long".into(), "x".into()]);
        assert_eq!(rows.render(Format::Table), "a     bb\nlong  x\n");
    }
}
