//! `proxi init`: the starter files to edit.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

/// `proxi init`: writes the starter files and says what each one is for.
pub(crate) fn run(dir: &Path) -> Result<ExitCode> {
    let written = proxi::starter::write_starter_files(dir)?;
    for (file, path) in proxi::starter::STARTER_FILES.iter().zip(&written) {
        println!("wrote {}: {}", path.display(), file.purpose);
    }
    println!(
        "next: cd {} && proxi policy check && proxi serve",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
