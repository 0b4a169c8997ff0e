//! Private PostgreSQL and RabbitMQ instances for tests: each in its own temporary directory, on
//! free loopback ports, torn down by `Drop` (also when a test panics).
//!
//! * [`Postgres`]: `initdb` (as the `postgres` user via `runuser` when running as root, since
//!   initdb refuses root), `pg_ctl start -w` with `-k DIR` so nothing touches
//!   /var/run/postgresql. Dropped with `pg_ctl stop -m immediate`, then SIGKILL to the
//!   postmaster's process group if it is still there.
//! * [`Rabbit`]: our own `epmd` (foreground child on a private port) and
//!   `/usr/lib/rabbitmq/bin/rabbitmq-server` in its own process group with a private HOME
//!   (cookie), node name, ports, mnesia and log dirs. Dropped by SIGTERM then SIGKILL to the
//!   group, and epmd killed by pid.
//!
//! When a component cannot run here (binaries missing, initdb impossible), `start` returns
//! [`Unavailable`] and the caller prints a `SKIPPED` line that the test harness does not
//! swallow ([`skipped`]).

#![allow(dead_code)]

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, User};
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why an external component cannot run on this machine.
#[derive(Debug)]
pub struct Unavailable(pub String);

/// Prints a SKIPPED line straight to the process's stderr (bypassing libtest's capture, so a
/// skipped test is visible even when it "passes").
pub fn skipped(test: &str, why: &Unavailable) {
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {} (needs PostgreSQL 15 and RabbitMQ; run as root or as a user that can initdb)",
        why.0
    );
}

/// Free TCP ports on 127.0.0.1, distinct, below the kernel's range for outgoing connections
/// (so no connection takes one before its server starts): [`lab::ports::pick_free`].
pub fn free_ports<const N: usize>() -> [u16; N] {
    let picked: Vec<_> = (0..N)
        .map(|_| lab::ports::pick_free().expect("a free port on 127.0.0.1"))
        .collect();
    std::array::from_fn(|i| picked[i].1)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A private PostgreSQL cluster.
pub struct Postgres {
    dir: tempfile::TempDir,
    data: PathBuf,
    pub port: u16,
    /// Run the server binaries as `postgres` (we are root).
    as_postgres: bool,
    /// `fsync=on` (benchmarks) or off (functional tests: faster, same semantics while the
    /// machine stays up).
    fsync: bool,
}

impl Postgres {
    fn command(&self, program: &str) -> Command {
        let path = format!("{PG_BIN}/{program}");
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", &path]);
            c
        } else {
            Command::new(path)
        }
    }

    /// initdb + start with `fsync=off`. `Unavailable` when PostgreSQL cannot run here.
    pub fn start() -> Result<Postgres, Unavailable> {
        Postgres::start_with(false)
    }

    /// initdb + start with `fsync=on`, as in production (for benchmarks).
    pub fn start_durable() -> Result<Postgres, Unavailable> {
        Postgres::start_with(true)
    }

    fn start_with(fsync: bool) -> Result<Postgres, Unavailable> {
        if !Path::new(PG_BIN).join("initdb").exists() {
            return Err(Unavailable(format!("{PG_BIN}/initdb not found")));
        }
        let dir = tempfile::Builder::new()
            .prefix("persistence-test-pg-")
            .tempdir()
            .map_err(|e| Unavailable(format!("tempdir: {e}")))?;
        let as_postgres = is_root();
        if as_postgres {
            let user = User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or_else(|| Unavailable("running as root but no postgres user".into()))?;
            std::os::unix::fs::chown(dir.path(), Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .map_err(|e| Unavailable(format!("chown tempdir to postgres: {e}")))?;
        }
        let pg = Postgres {
            data: dir.path().join("data"),
            dir,
            port: free_ports::<1>()[0],
            as_postgres,
            fsync,
        };
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&pg.data)
            .args(["--auth=trust", "-E", "UTF8", "-U", "postgres", "--no-sync"])
            .output()
            .map_err(|e| Unavailable(format!("running initdb: {e}")))?;
        if !out.status.success() {
            return Err(Unavailable(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        pg.start_again();
        Ok(pg)
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={} -c max_connections=50",
            self.port,
            self.dir.path().display(),
            if self.fsync { "on" } else { "off" }
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-o", &opts, "-l"])
            .arg(self.dir.path().join("postgres.log"))
            .args(["-w", "-t", "60", "start"])
            .output()
            .expect("running pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&self.dir.path().join("postgres.log"), 30)
        );
    }

    /// `pg_ctl stop -m fast`: what an outage looks like to clients (connections closed).
    pub fn stop_fast(&self) {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .output()
            .expect("running pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `db`.
    pub fn create_database(&self, db: &str) {
        let out = Command::new(format!("{PG_BIN}/createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                db,
            ])
            .output()
            .expect("running createdb");
        assert!(
            out.status.success(),
            "createdb {db}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn postmaster_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let pid = self.postmaster_pid();
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "10", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(pid) = pid {
            // pg_ctl starts the postmaster in its own session: its pid is the group id.
            if kill(Pid::from_raw(pid), None).is_ok() {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

const RABBIT_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const RABBITMQCTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// A private RabbitMQ node.
pub struct Rabbit {
    dir: tempfile::TempDir,
    pub port: u16,
    pub node: String,
    env: Vec<(String, String)>,
    server: Child,
    epmd: Child,
}

impl Rabbit {
    /// Starts epmd and the node, waits (polling AMQP with a deadline) until it accepts
    /// connections.
    pub async fn start() -> Result<Rabbit, Unavailable> {
        if !Path::new(RABBIT_SERVER).exists() {
            return Err(Unavailable(format!("{RABBIT_SERVER} not found")));
        }
        let epmd_bin = ["/usr/bin/epmd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| Unavailable("epmd not found".into()))?;
        let dir = tempfile::Builder::new()
            .prefix("persistence-test-rabbit-")
            .tempdir()
            .map_err(|e| Unavailable(format!("tempdir: {e}")))?;
        let home = dir.path().join("home");
        let mnesia = dir.path().join("mnesia");
        let logs = dir.path().join("log");
        for d in [&home, &mnesia, &logs] {
            std::fs::create_dir_all(d).map_err(|e| Unavailable(format!("mkdir: {e}")))?;
        }
        let [port, dist_port, epmd_port] = free_ports();
        let node = format!("persistence-test-{port}@localhost");
        let conf = dir.path().join("rabbitmq.conf");
        std::fs::write(
            &conf,
            "disk_free_limit.absolute = 1MB\nvm_memory_high_watermark.relative = 0.9\n",
        )
        .map_err(|e| Unavailable(format!("write conf: {e}")))?;
        let plugins = dir.path().join("enabled_plugins");
        std::fs::write(&plugins, "[].\n").map_err(|e| Unavailable(format!("{e}")))?;
        let env_file = dir.path().join("rabbitmq-env.conf");
        std::fs::write(&env_file, "").map_err(|e| Unavailable(format!("{e}")))?;
        let p = |p: &Path| p.display().to_string();
        let env: Vec<(String, String)> = vec![
            ("HOME".into(), p(&home)),
            ("ERL_EPMD_PORT".into(), epmd_port.to_string()),
            ("ERL_EPMD_ADDRESS".into(), "127.0.0.1".into()),
            ("RABBITMQ_NODENAME".into(), node.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS".into(), "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT".into(), port.to_string()),
            ("RABBITMQ_DIST_PORT".into(), dist_port.to_string()),
            ("RABBITMQ_MNESIA_BASE".into(), p(&mnesia)),
            ("RABBITMQ_LOG_BASE".into(), p(&logs)),
            ("RABBITMQ_ENABLED_PLUGINS_FILE".into(), p(&plugins)),
            ("RABBITMQ_CONFIG_FILE".into(), p(&conf)),
            ("RABBITMQ_CONF_ENV_FILE".into(), p(&env_file)),
            (
                "RABBITMQ_PID_FILE".into(),
                p(&dir.path().join("rabbit.pid")),
            ),
        ];
        let epmd = Command::new(epmd_bin)
            .args(["-port", &epmd_port.to_string()])
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| Unavailable(format!("starting epmd: {e}")))?;
        let out = std::fs::File::create(dir.path().join("server.out"))
            .map_err(|e| Unavailable(format!("{e}")))?;
        let err = out.try_clone().map_err(|e| Unavailable(format!("{e}")))?;
        let server = match Command::new(RABBIT_SERVER)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
        {
            Ok(s) => s,
            Err(e) => {
                let mut epmd = epmd;
                let _ = epmd.kill();
                let _ = epmd.wait();
                return Err(Unavailable(format!("starting rabbitmq-server: {e}")));
            }
        };
        let mut rabbit = Rabbit {
            dir,
            port,
            node,
            env,
            server,
            epmd,
        };
        rabbit.wait_ready(Duration::from_secs(120)).await;
        Ok(rabbit)
    }

    /// `amqp://` URL of the default vhost.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    async fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.server.try_wait() {
                panic!(
                    "rabbitmq-server exited with {status} during start:\n{}",
                    tail(&self.dir.path().join("server.out"), 40)
                );
            }
            let attempt = tokio::time::timeout(
                Duration::from_secs(2),
                lapin::Connection::connect(&self.url(), lapin::ConnectionProperties::default()),
            )
            .await;
            if let Ok(Ok(conn)) = attempt {
                let _ = conn.close(200, "ready".into()).await;
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "rabbitmq not ready after {timeout:?}:\n{}",
                tail(&self.dir.path().join("server.out"), 40)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs `rabbitmqctl -n NODE ARGS..` with the node's HOME and epmd port.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(RABBITMQCTL)
            .args(["-n", &self.node])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("running rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `(messages_ready, messages_unacknowledged)` of `queue`, from `rabbitmqctl list_queues`.
    pub fn queue_depth(&self, queue: &str) -> Option<(u64, u64)> {
        let out = self.ctl(&[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ]);
        out.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [name, ready, unacked] if *name == queue => {
                    Some((ready.parse().ok()?, unacked.parse().ok()?))
                }
                _ => None,
            }
        })
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        let group = Pid::from_raw(self.server.id() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.server.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever is left of the group (beam, erl_child_setup, inet_gethost).
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.server.wait();
        let _ = self.epmd.kill();
        let _ = self.epmd.wait();
    }
}

/// A TCP relay to a server whose connections can be *frozen*: bytes stop moving both ways while
/// both sockets stay open, as with a peer that hangs (no close, no reset, no error: only
/// silence). Connections made after a freeze are relayed normally. Stops with the test.
pub struct Relay {
    pub addr: std::net::SocketAddr,
    epoch: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listens on a free loopback port and relays every connection to `upstream`.
    pub async fn start(upstream: std::net::SocketAddr) -> Relay {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let epoch = Arc::new(tokio::sync::watch::channel(0u64).0);
        let accepted = Arc::new(AtomicUsize::new(0));
        let (epochs, count) = (epoch.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            // Frozen connections are kept here, open, until the relay stops.
            let held = Arc::new(std::sync::Mutex::new(Vec::new()));
            while let Ok((mut client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let mut frozen = epochs.subscribe();
                let held = held.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = frozen.changed() => {
                            if let Ok(mut held) = held.lock() {
                                held.push((client, server));
                            }
                        }
                    }
                });
            }
        });
        Relay {
            addr,
            epoch,
            accepted,
            task,
        }
    }

    /// Freezes every connection open now.
    pub fn freeze_current(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
