//! The set-up the in-process backup tests share: two hosts on a fresh
//! in-process array, quiet runs, a file-system backup with its agent on a
//! thread, the server serving one session on a thread, and the `stp`
//! command on a repository.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::thread::{self, JoinHandle};

use sim_target::FaultControl;
use stp_tools::backup::inproc::{free_wkp, InProcArray};
use stp_tools::backup::pipe::Policy;
use stp_tools::backup::repo::Repo;
use stp_tools::backup::session::{
    db_serve, fs_agent, fs_backup, AgentRules, FsJob, Host, Outcome, RunOptions,
};
use stp_tools::backup::wire::Level;

/// Both hosts' address.
pub const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A run without progress bars.
pub fn quiet() -> RunOptions {
    RunOptions {
        quiet: true,
        ..RunOptions::default()
    }
}

/// A fresh array (`seed` fixes its port allocation) and its two hosts on
/// a free WKP: the server (host 0) with policy `sp`, the client (host 1)
/// with policy `cp` and, with `kill`, its paths through that fault
/// injector.
pub fn hosts(
    seed: u64,
    sp: Policy,
    cp: Policy,
    kill: Option<FaultControl>,
) -> (InProcArray, Host, Host) {
    let array = InProcArray::new(seed).unwrap();
    let wkp = free_wkp().unwrap();
    let server = array.host(0, wkp, sp, None);
    let client = array.host(1, wkp, cp, kill);
    (array, server, client)
}

/// A backup of the tree `src` from the client named `client`.
pub fn fs_job(src: &Path, level: Level) -> FsJob {
    FsJob {
        client: LOCAL,
        client_name: Some("client".into()),
        source: src.display().to_string(),
        level,
        excludes: Vec::new(),
    }
}

/// Runs one file-system backup: the agent on `client` in a thread, the
/// server here. Returns (server, agent) results.
pub fn fs_run(
    server: &Host,
    client: &Host,
    repo: &Repo,
    job: &FsJob,
    agent_opts: RunOptions,
) -> (anyhow::Result<Outcome>, anyhow::Result<Outcome>) {
    let c = client.clone();
    let agent = thread::spawn(move || fs_agent(&c, &AgentRules::default(), agent_opts));
    let s = fs_backup(server, repo, job, quiet());
    let a = agent.join().expect("the agent panicked");
    (s, a)
}

/// `server` serving one client-initiated session (a database backup or a
/// restore) on a thread, with a handle of its own on the repository at
/// `repo_dir`.
pub fn serve(
    server: &Host,
    repo_dir: &Path,
    opts: RunOptions,
) -> JoinHandle<anyhow::Result<Outcome>> {
    let (s, dir) = (server.clone(), repo_dir.to_path_buf());
    thread::spawn(move || db_serve(&s, &Repo::open(dir).unwrap(), opts))
}

/// The output of `stp ARGS --repo REPO`, which must succeed.
pub fn stp(args: &[&str], repo: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_stp"))
        .args(args)
        .arg("--repo")
        .arg(repo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stp {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
