//! Records the commit `vmfactory --version` names: `$VMFACTORY_COMMIT` if set (packagers
//! building outside a checkout), else `git rev-parse` of the checkout, else `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=VMFACTORY_COMMIT");
    let commit = match std::env::var("VMFACTORY_COMMIT") {
        Ok(c) if !c.is_empty() => c,
        _ => {
            // Rebuild when HEAD moves: HEAD itself, the branch it names, and packed refs.
            let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
            if let Some(branch) = git(&["rev-parse", "--symbolic-full-name", "HEAD"]) {
                watched.push(branch);
            }
            for name in watched {
                if let Some(path) =
                    git(&["rev-parse", "--path-format=absolute", "--git-path", &name])
                {
                    println!("cargo:rerun-if-changed={path}");
                }
            }
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some();
            match git(&["rev-parse", "--short=12", "HEAD"]) {
                Some(c) if dirty => format!("{c}-modified"),
                Some(c) => c,
                None => "unknown".to_owned(),
            }
        }
    };
    println!("cargo:rustc-env=VMFACTORY_COMMIT={commit}");
}
