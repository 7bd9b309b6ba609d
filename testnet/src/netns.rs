//! A network on this machine: one namespace per devpod, routed through a router namespace to
//! the host (the root namespace, where PostgreSQL, Garage, the gateway and the S3 delay proxy
//! run), every link rate-limited with `tc` (TBF; `tc netem` is missing on the machines this
//! runs on, so latency to S3 comes from the user-space delay proxy).
//!
//! ```text
//!   host 10.213.0.1 ── veth ── router 10.213.0.2
//!                               ├── 10.213.1.1 ── veth ── devpod 1  10.213.1.2
//!                               ├── 10.213.2.1 ── veth ── devpod 2  10.213.2.2
//!                               └── ...
//! ```
//!
//! Names carry the owning process id (`ptn<pid>-...`): [`sweep`] removes the namespaces, links
//! and processes of runs whose process is gone, so a crashed run leaves nothing behind for
//! long, and [`Net`] tears its own down when dropped. One network exists at a time on a
//! machine (a file lock): runs and tests wait for each other.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, bail};

/// Devpods one network holds at most.
pub const MAX_DEVPODS: usize = 250;

/// A network of `n` devpods.
#[derive(Debug)]
pub struct Net {
    prefix: String,
    pub devpods: usize,
    /// One network on a machine at a time (they share the addresses): held while it lives.
    _lock: std::fs::File,
}

/// The lock every network holds while it exists.
const LOCK: &str = "/run/podfs-testnet.lock";

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Names of the namespaces on this machine.
fn namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    text.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

/// Kills every process in namespace `ns`, then deletes it.
fn delete_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = ip(&["netns", "delete", ns]);
}

/// Removes what runs whose process is gone left behind.
pub fn sweep() {
    for ns in namespaces() {
        let Some(rest) = ns.strip_prefix("ptn") else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            delete_namespace(&ns);
            let _ = ip(&["link", "delete", &format!("ptn{pid}-h")]);
        }
    }
}

impl Net {
    /// The address of the host (services) side.
    pub const HOST: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);

    /// Builds the network: `devpods` namespaces, each link limited to `devpod_mbit`, the
    /// host's link to the router to `services_mbit`.
    pub fn create(devpods: usize, devpod_mbit: u32, services_mbit: u32) -> anyhow::Result<Self> {
        if devpods == 0 || devpods > MAX_DEVPODS {
            bail!("a testnet holds 1 to {MAX_DEVPODS} devpods, not {devpods}");
        }
        let lock = std::fs::File::create(LOCK).with_context(|| format!("cannot create {LOCK} (it needs root)"))?;
        // waits while another run (another test, another process) has its network up
        lock.lock().with_context(|| format!("cannot lock {LOCK}"))?;
        sweep();
        let net = Self { prefix: format!("ptn{}", std::process::id()), devpods, _lock: lock };
        net.build(devpod_mbit, services_mbit).context("cannot build the test network (it needs root and iproute2)")?;
        Ok(net)
    }

    fn router(&self) -> String {
        format!("{}-r", self.prefix)
    }

    /// The namespace of devpod `i` (1-based).
    pub fn namespace(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    /// Devpod `i`'s address.
    pub fn devpod_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, i as u8, 2)
    }

    /// A command run inside devpod `i`'s namespace.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.namespace(i)]).arg(program);
        c
    }

    fn build(&self, devpod_mbit: u32, services_mbit: u32) -> anyhow::Result<()> {
        let r = self.router();
        let host_if = format!("{}-h", self.prefix);
        ip(&["netns", "add", &r])?;
        ip(&["-n", &r, "link", "set", "lo", "up"])?;
        run("ip", &["netns", "exec", &r, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", "uplink", "netns", &r])?;
        ip(&["addr", "add", "10.213.0.1/24", "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&["-n", &r, "addr", "add", "10.213.0.2/24", "dev", "uplink"])?;
        ip(&["-n", &r, "link", "set", "uplink", "up"])?;
        ip(&["route", "add", "10.213.0.0/16", "via", "10.213.0.2"])?;
        limit(None, &host_if, services_mbit)?;
        limit(Some(&r), "uplink", services_mbit)?;
        for i in 1..=self.devpods {
            let ns = self.namespace(i);
            let (rif, dip, rip) = (format!("d{i}"), format!("10.213.{i}.2/24"), format!("10.213.{i}.1/24"));
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &r, "link", "add", &rif, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &r, "addr", "add", &rip, "dev", &rif])?;
            ip(&["-n", &r, "link", "set", &rif, "up"])?;
            ip(&["-n", &ns, "addr", "add", &dip, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", &format!("10.213.{i}.1")])?;
            limit(Some(&r), &rif, devpod_mbit)?;
            limit(Some(&ns), "eth0", devpod_mbit)?;
        }
        Ok(())
    }

    /// Kills every process of the network and removes it.
    pub fn teardown(&self) {
        for i in 1..=self.devpods {
            delete_namespace(&self.namespace(i));
        }
        delete_namespace(&self.router());
        let _ = ip(&["link", "delete", &format!("{}-h", self.prefix)]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A token bucket of `mbit` Mbit/s on the egress of `dev` (in namespace `ns`).
fn limit(ns: Option<&str>, dev: &str, mbit: u32) -> anyhow::Result<()> {
    let rate = format!("{mbit}mbit");
    // a burst of at least a few ms of traffic, as TBF needs at high rates
    let burst = format!("{}kb", (mbit / 8).max(64));
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst, "latency", "20ms"]);
    run("tc", &args)
}
