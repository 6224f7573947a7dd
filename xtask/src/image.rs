//! `cargo xtask image`: the runtime image, built without pulling anything. The Dockerfile's
//! runtime stage says what the image is (Debian suite, packages, where the binary goes, ENV,
//! ENTRYPOINT, CMD); this builds that from a Debian base made with debootstrap from the
//! machine's own Debian mirror (cached under target/image/base) and the release binary built on
//! the host, with podman (`podman import` for the base, `podman build` for the layer on top).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, ensure, Context};

/// The image `cargo xtask image` tags; tests/e2e/daemonset.rs runs the per-build tag instead
/// (SOCKSHIFT_IMAGE), which no other checkout's build can move.
pub const IMAGE: &str = "localhost/sockshift:latest";
/// An imported image has no environment at all: this is the PATH Debian's images carry.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Bump when the way the base is made changes, so cached bases are rebuilt.
const BASE_RECIPE_VERSION: u32 = 2;

/// What the Dockerfile's last stage asks for.
#[derive(Debug, PartialEq)]
pub struct RuntimeStage {
    /// Debian suite of `FROM debian:<suite>-slim`.
    pub suite: String,
    /// `ARG RUNTIME_PACKAGES="..."`.
    pub packages: Vec<String>,
    /// Destination of `COPY --from=builder <binary> <destination>`.
    pub binary_destination: String,
    /// ENV, LABEL, WORKDIR, ENTRYPOINT and CMD instructions, verbatim and in order.
    pub instructions: Vec<String>,
}

/// Reads the last stage of a Dockerfile (continuation lines joined, comments dropped).
pub fn parse_runtime_stage(dockerfile: &str) -> anyhow::Result<RuntimeStage> {
    let mut logical: Vec<String> = Vec::new();
    let mut pending = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                pending.push_str(head);
                pending.push(' ');
            }
            None => {
                pending.push_str(trimmed);
                logical.push(std::mem::take(&mut pending));
            }
        }
    }
    let start = logical.iter().rposition(|l| keyword(l) == "FROM").context("the Dockerfile has no FROM instruction")?;
    let stage = &logical[start..];
    let image = stage[0].split_whitespace().nth(1).context("FROM without an image")?;
    let suite = image
        .strip_prefix("debian:")
        .and_then(|tag| tag.strip_suffix("-slim"))
        .with_context(|| {
            format!("the runtime stage's base is {image}: only debian:<suite>-slim can be made with debootstrap")
        })?
        .to_owned();
    let mut packages = None;
    let mut binary_destination = None;
    let mut instructions = Vec::new();
    for line in &stage[1..] {
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        match keyword(line).as_str() {
            "ARG" => {
                let declaration = line.split_once(char::is_whitespace).map_or("", |(_, rest)| rest.trim());
                if let Some(list) = declaration.strip_prefix("RUNTIME_PACKAGES=") {
                    packages = Some(list.trim_matches('"').split_whitespace().map(str::to_owned).collect());
                }
            }
            "COPY" if args.first().is_some_and(|a| a.starts_with("--from=")) => {
                ensure!(args.len() == 3, "the runtime stage's COPY --from must copy one file: {line}");
                binary_destination = Some(args[2].to_owned());
            }
            "COPY" | "ADD" => bail!("the runtime stage may only COPY the binary from the builder: {line}"),
            "RUN" => ensure!(
                line.contains("$RUNTIME_PACKAGES"),
                "the runtime stage's RUN may only install $RUNTIME_PACKAGES (cargo xtask image cannot repeat it): {line}"
            ),
            "ENV" | "LABEL" | "WORKDIR" | "ENTRYPOINT" | "CMD" => instructions.push(line.clone()),
            other => bail!("cargo xtask image does not know the runtime stage's {other} instruction: {line}"),
        }
    }
    Ok(RuntimeStage {
        suite,
        packages: packages.context("the runtime stage has no ARG RUNTIME_PACKAGES=\"...\"")?,
        binary_destination: binary_destination.context("the runtime stage has no COPY --from=builder of the binary")?,
        instructions,
    })
}

fn keyword(line: &str) -> String {
    line.split_whitespace().next().unwrap_or("").to_ascii_uppercase()
}

/// One `deb` entry of the machine's APT sources.
#[derive(Debug, PartialEq)]
pub struct AptSource {
    pub uri: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
}

/// `deb` entries of one-line-style text (`deb [options] URI SUITE COMPONENT...`).
pub fn parse_one_line_sources(text: &str) -> Vec<AptSource> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let rest = line.strip_prefix("deb ")?.trim_start();
            // Options in brackets come before the URI.
            let rest = match rest.strip_prefix('[') {
                Some(options) => options.split_once(']')?.1,
                None => rest,
            };
            let mut fields = rest.split_whitespace();
            let uri = fields.next()?.to_owned();
            let suite = fields.next()?.to_owned();
            Some(AptSource { uri, suites: vec![suite], components: fields.map(str::to_owned).collect() })
        })
        .collect()
}

/// `deb` entries of deb822-style text (`Types:`, `URIs:`, `Suites:`, `Components:` stanzas).
pub fn parse_deb822_sources(text: &str) -> Vec<AptSource> {
    let mut sources = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| -> Vec<String> {
            stanza
                .lines()
                .filter(|l| !l.starts_with(char::is_whitespace) && !l.starts_with('#'))
                .find_map(|l| l.split_once(':').filter(|(key, _)| key.trim().eq_ignore_ascii_case(name)))
                .map(|(_, value)| value.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default()
        };
        if !field("Types").iter().any(|t| t == "deb") || field("Enabled").iter().any(|e| e == "no") {
            continue;
        }
        for uri in field("URIs") {
            sources.push(AptSource { uri, suites: field("Suites"), components: field("Components") });
        }
    }
    sources
}

/// The machine's APT sources: /etc/apt/sources.list and /etc/apt/sources.list.d/*.{list,sources}.
fn machine_sources() -> Vec<AptSource> {
    let mut sources = parse_one_line_sources(&std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    let mut files: Vec<PathBuf> = std::fs::read_dir("/etc/apt/sources.list.d")
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        match file.extension().and_then(|e| e.to_str()) {
            Some("list") => sources.extend(parse_one_line_sources(&text)),
            Some("sources") => sources.extend(parse_deb822_sources(&text)),
            _ => {}
        }
    }
    sources
}

/// The mirror debootstrap uses (the first source of `suite` with `main`), and the sources the
/// image keeps (every source of the suite and its -updates/-security suites, `main` only).
pub fn debian_sources(sources: &[AptSource], suite: &str) -> anyhow::Result<(String, String)> {
    let main = |s: &&AptSource| s.components.iter().any(|c| c == "main");
    let mirror =
        sources.iter().filter(main).find(|s| s.suites.iter().any(|x| x == suite)).map(|s| s.uri.clone()).with_context(
            || {
                format!(
                "no APT source in /etc/apt/sources.list* serves Debian {suite} main: debootstrap needs a Debian mirror"
            )
            },
        )?;
    let mut kept = String::new();
    for source in sources.iter().filter(main) {
        let suites: Vec<&str> = source
            .suites
            .iter()
            .map(String::as_str)
            .filter(|s| *s == suite || s.strip_prefix(suite).is_some_and(|rest| rest.starts_with('-')))
            .collect();
        if !suites.is_empty() {
            kept.push_str(&format!(
                "Types: deb\nURIs: {}\nSuites: {}\nComponents: main\n\n",
                source.uri,
                suites.join(" ")
            ));
        }
    }
    Ok((mirror, kept))
}

/// Builds the image and returns the per-build name (`localhost/sockshift:build-<id>`), also
/// tagged [`IMAGE`] and written to target/image/name.
pub fn build(workspace: &Path, target_dir: &Path) -> anyhow::Result<String> {
    let started = Instant::now();
    let dockerfile = workspace.join("Dockerfile");
    let text = std::fs::read_to_string(&dockerfile).with_context(|| format!("reading {}", dockerfile.display()))?;
    let stage =
        parse_runtime_stage(&text).with_context(|| format!("reading the runtime stage of {}", dockerfile.display()))?;
    let image_dir = target_dir.join("image");
    let base = ensure_base(&stage, &image_dir.join("base"))?;

    let step = Instant::now();
    crate::cargo(&["build", "--release", "--package", "agent"]).context("building the release sockshift binary")?;
    println!("[image] release binary built in {:.0?}", step.elapsed());

    let context = image_dir.join("context");
    std::fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    let binary = target_dir.join("release/sockshift");
    std::fs::copy(&binary, context.join("sockshift")).with_context(|| format!("copying {}", binary.display()))?;
    let mut containerfile = format!("FROM {base}\nCOPY sockshift {}\n", stage.binary_destination);
    for instruction in &stage.instructions {
        containerfile.push_str(instruction);
        containerfile.push('\n');
    }
    std::fs::write(context.join("Containerfile"), containerfile).context("writing the Containerfile")?;
    let id_file = context.join("image-id");
    podman(&[
        "build",
        "--quiet",
        "--pull=never",
        "--network=none",
        "--iidfile",
        &id_file.to_string_lossy(),
        "--tag",
        IMAGE,
        "--file",
        &context.join("Containerfile").to_string_lossy(),
        &context.to_string_lossy(),
    ])
    .context("podman build of the image layer")?;
    let id = std::fs::read_to_string(&id_file).context("reading the built image's id")?;
    let id = id.trim().trim_start_matches("sha256:");
    let name = format!("localhost/sockshift:build-{}", &id[..12.min(id.len())]);
    podman(&["tag", id, &name])?;
    // This checkout's previous build is no longer needed (a container still using it keeps it).
    let name_file = image_dir.join("name");
    if let Ok(previous) = std::fs::read_to_string(&name_file) {
        if previous.trim() != name {
            let _ = podman(&["rmi", previous.trim()]);
        }
    }
    // The image must start under this podman configuration and find every library it links.
    let version = podman(&["run", "--rm", "--network=none", &name, "--version"])
        .context("the image does not start: `podman run --rm IMAGE --version` failed")?;
    std::fs::write(&name_file, format!("{name}\n")).context("writing target/image/name")?;
    println!("[image] {name} (also {IMAGE}): {} in {:.0?}", version.trim(), started.elapsed());
    Ok(name)
}

/// The base image (debootstrap, the runtime packages, security updates), cached: the rootfs
/// tarball under `dir` survives `podman` storage resets, the imported image id is reused while
/// podman still has it. Returns the base's image id.
fn ensure_base(stage: &RuntimeStage, dir: &Path) -> anyhow::Result<String> {
    let (mirror, kept_sources) = debian_sources(&machine_sources(), &stage.suite)?;
    let recipe = format!(
        "recipe {BASE_RECIPE_VERSION}\nsuite {}\nmirror {mirror}\npackages {}\nsources:\n{kept_sources}",
        stage.suite,
        stage.packages.join(" ")
    );
    let recipe_file = dir.join("recipe");
    let tarball = dir.join("rootfs.tar");
    let id_file = dir.join("image-id");
    let cached = std::fs::read_to_string(&recipe_file).ok().as_deref() == Some(recipe.as_str()) && tarball.exists();
    if cached {
        if let Ok(id) = std::fs::read_to_string(&id_file) {
            if succeeds_quietly(Command::new("podman").args(["image", "exists", id.trim()])) {
                println!("[image] base {} (cached)", &id.trim()[..12.min(id.trim().len())]);
                return Ok(id.trim().to_owned());
            }
        }
    } else {
        let step = Instant::now();
        make_rootfs_tarball(stage, &mirror, &kept_sources, dir)?;
        std::fs::write(&recipe_file, &recipe).context("writing the base recipe")?;
        println!("[image] base root filesystem made with debootstrap in {:.0?}", step.elapsed());
    }
    let step = Instant::now();
    let output = podman(&[
        "import",
        "--quiet",
        "--change",
        &format!("ENV PATH={PATH}"),
        "--message",
        &format!("debootstrap {} from {mirror} with {}", stage.suite, stage.packages.join(" ")),
        &tarball.to_string_lossy(),
        &format!("localhost/sockshift-base:{}", stage.suite),
    ])
    .context("podman import of the base root filesystem")?;
    let id = output.trim().trim_start_matches("sha256:").to_owned();
    ensure!(!id.is_empty(), "podman import printed no image id");
    std::fs::write(&id_file, &id).context("writing the base image id")?;
    println!("[image] base imported in {:.0?}", step.elapsed());
    Ok(id)
}

fn make_rootfs_tarball(stage: &RuntimeStage, mirror: &str, kept_sources: &str, dir: &Path) -> anyhow::Result<()> {
    let rootfs = dir.join("rootfs");
    remove_rootfs(&rootfs)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    println!("[image] debootstrap {} from {mirror} with {} (a minute or two)", stage.suite, stage.packages.join(", "));
    let mut debootstrap = Command::new("debootstrap");
    debootstrap.args(["--variant=minbase", "--components=main"]);
    if !stage.packages.is_empty() {
        debootstrap.arg(format!("--include={}", stage.packages.join(",")));
    }
    debootstrap.arg(&stage.suite).arg(&rootfs).arg(mirror);
    run_logged(&mut debootstrap, &dir.join("debootstrap.log")).context("debootstrap")?;

    slim_down(&rootfs)?;
    // The same sources the machine uses for this suite, security updates included, as the
    // Dockerfile's base (Debian's official image) has; then bring every package up to date.
    let apt_dir = rootfs.join("etc/apt");
    let _ = std::fs::remove_file(apt_dir.join("sources.list"));
    std::fs::write(apt_dir.join("sources.list.d/debian.sources"), kept_sources)
        .context("writing the image's APT sources")?;
    {
        let _proc = ProcMount::new(&rootfs)?;
        for args in [&["update", "-qq"][..], &["upgrade", "-y", "-qq"][..], &["clean"][..]] {
            run_logged(
                Command::new("chroot")
                    .arg(&rootfs)
                    .args(["/usr/bin/env", "-i", &format!("PATH={PATH}"), "DEBIAN_FRONTEND=noninteractive", "apt-get"])
                    .args(args),
                &dir.join("apt.log"),
            )
            .with_context(|| format!("apt-get {} in the new root filesystem", args[0]))?;
        }
    }
    clean_caches(&rootfs)?;
    let partial = dir.join("rootfs.tar.partial");
    run_logged(
        Command::new("tar").arg("--numeric-owner").arg("-C").arg(&rootfs).arg("-cf").arg(&partial).arg("."),
        &dir.join("tar.log"),
    )
    .context("packing the root filesystem")?;
    std::fs::rename(&partial, dir.join("rootfs.tar")).context("keeping the root filesystem tarball")?;
    remove_rootfs(&rootfs)
}

/// What Debian's slim images leave out: documentation (but the copyright files), manual pages
/// and translations; a dpkg configuration keeps later package installs from bringing them back.
const SLIM_DPKG_CONFIG: &str = "# Written by cargo xtask image: as in Debian's slim images.\n\
    path-exclude /usr/share/doc/*\n\
    path-include /usr/share/doc/*/copyright\n\
    path-exclude /usr/share/groff/*\n\
    path-exclude /usr/share/info/*\n\
    path-exclude /usr/share/linda/*\n\
    path-exclude /usr/share/lintian/*\n\
    path-exclude /usr/share/locale/*\n\
    path-exclude /usr/share/man/*\n";

fn slim_down(rootfs: &Path) -> anyhow::Result<()> {
    std::fs::write(rootfs.join("etc/dpkg/dpkg.cfg.d/slim"), SLIM_DPKG_CONFIG).context("writing the dpkg excludes")?;
    for dir in [
        "usr/share/groff",
        "usr/share/info",
        "usr/share/linda",
        "usr/share/lintian",
        "usr/share/locale",
        "usr/share/man",
    ] {
        remove_contents(&rootfs.join(dir), &|_| false)?;
    }
    remove_contents(&rootfs.join("usr/share/doc"), &|path| path.file_name().is_some_and(|n| n == "copyright"))
}

/// Removes everything under `dir` (which stays) but the files `keep` accepts.
fn remove_contents(dir: &Path, keep: &dyn Fn(&Path) -> bool) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries {
        let path = entry?.path();
        let metadata = std::fs::symlink_metadata(&path)?;
        if metadata.is_dir() {
            remove_contents(&path, keep)?;
            // Left in place when something in it was kept.
            let _ = std::fs::remove_dir(&path);
        } else if !keep(&path) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Package lists, as Debian's images drop them (`apt-get clean` has removed the archives).
fn clean_caches(rootfs: &Path) -> anyhow::Result<()> {
    remove_contents(&rootfs.join("var/lib/apt/lists"), &|_| false)?;
    std::fs::create_dir_all(rootfs.join("var/lib/apt/lists/partial")).context("recreating the APT lists directory")
}

/// /proc mounted in the new root filesystem while apt runs there (dpkg's scripts read it).
struct ProcMount(PathBuf);

impl ProcMount {
    fn new(rootfs: &Path) -> anyhow::Result<Self> {
        let target = rootfs.join("proc");
        let status = Command::new("mount").args(["-t", "proc", "proc"]).arg(&target).status()?;
        ensure!(status.success(), "mounting proc at {}", target.display());
        Ok(Self(target))
    }
}

impl Drop for ProcMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Removes a (possibly half-made) root filesystem, unmounting first whatever an interrupted
/// debootstrap or apt run left mounted in it: removing through a mount would reach the host.
fn remove_rootfs(rootfs: &Path) -> anyhow::Result<()> {
    if !rootfs.exists() {
        return Ok(());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut mounted: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| Path::new(m).starts_with(rootfs))
        .collect();
    mounted.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in &mounted {
        let status = Command::new("umount").args(["--lazy", mount]).status()?;
        ensure!(status.success(), "cannot unmount {mount}: remove {} by hand", rootfs.display());
    }
    std::fs::remove_dir_all(rootfs).with_context(|| format!("removing {}", rootfs.display()))
}

/// Runs a command with its output in a log file; on failure, the error carries the log's tail.
fn run_logged(cmd: &mut Command, log: &Path) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let shown = format!("{cmd:?}");
    let status = cmd.stdout(file.try_clone()?).stderr(file).status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("{shown} failed ({status}); last lines of {}:\n{}", log.display(), tail.join("\n"));
    }
    Ok(())
}

fn succeeds_quietly(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

/// Runs podman; its stdout, or an error with its stderr.
fn podman(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("podman").args(args).output().context("running podman")?;
    if !output.status.success() {
        bail!(
            "podman {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_repositorys_dockerfile() {
        let text = include_str!("../../Dockerfile");
        let stage = parse_runtime_stage(text).unwrap();
        assert_eq!(stage.suite, "bookworm");
        assert_eq!(stage.packages, ["iproute2"]);
        assert_eq!(stage.binary_destination, "/usr/local/bin/sockshift");
        assert_eq!(
            stage.instructions,
            [r#"ENTRYPOINT ["sockshift"]"#, r#"CMD ["agent", "--config", "/etc/sockshift/sockshift.toml"]"#]
        );
    }

    #[test]
    fn refuses_a_runtime_stage_it_cannot_repeat() {
        let base = "FROM rust AS builder\nRUN make\nFROM debian:bookworm-slim\nARG RUNTIME_PACKAGES=\"a b\"\n\
                    COPY --from=builder /src/x /usr/bin/x\n";
        assert!(parse_runtime_stage(base).is_ok());
        for (extra, expected) in [
            ("RUN curl -o /x https://example.invalid/x\n", "may only install $RUNTIME_PACKAGES"),
            ("COPY config /etc/x\n", "may only COPY the binary"),
            ("USER nobody\n", "does not know the runtime stage's USER"),
        ] {
            let err = parse_runtime_stage(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(err.contains(expected), "{extra:?}: {err}");
        }
        let err = parse_runtime_stage("FROM alpine:3\n").unwrap_err().to_string();
        assert!(err.contains("only debian:<suite>-slim"), "{err}");
    }

    #[test]
    fn finds_the_debian_mirror_in_both_source_formats() {
        let deb822 = "Types: deb\n# http://snapshot.example/archive\nURIs: http://deb.example/debian\n\
                      Suites: bookworm bookworm-updates\nComponents: main\nSigned-By: /k.gpg\n\n\
                      Types: deb\nURIs: http://deb.example/debian-security\nSuites: bookworm-security\n\
                      Components: main\n\nTypes: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\
                      Components: main\n\nTypes: deb\nEnabled: no\nURIs: http://off.example\nSuites: bookworm\n\
                      Components: main\n";
        let sources = parse_deb822_sources(deb822);
        assert_eq!(sources.len(), 2, "{sources:?}");
        let (mirror, kept) = debian_sources(&sources, "bookworm").unwrap();
        assert_eq!(mirror, "http://deb.example/debian");
        assert_eq!(
            kept,
            "Types: deb\nURIs: http://deb.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
             Types: deb\nURIs: http://deb.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        );

        let one_line = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main contrib\n\
                        deb http://m.example/debian-security bookworm-security main\n\
                        deb http://other.example/apt cloud-sdk main\n";
        let sources = parse_one_line_sources(one_line);
        assert_eq!(sources.len(), 3);
        let (mirror, kept) = debian_sources(&sources, "bookworm").unwrap();
        assert_eq!(mirror, "http://m.example/debian");
        assert!(!kept.contains("other.example"), "{kept}");
        assert!(debian_sources(&sources, "trixie").unwrap_err().to_string().contains("serves Debian trixie main"));
    }
}
