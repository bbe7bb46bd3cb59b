//! The real Kubernetes control-plane binaries, built from Go modules into a
//! cache outside the work tree and reused.
//!
//! The recipe ([`Recipe`]): `kube-apiserver`, `kube-controller-manager`,
//! `kube-scheduler`, `kubectl` and `kube-proxy` from the `k8s.io/kubernetes`
//! module at one release, every `k8s.io/*` staging module pinned to the
//! matching `v0.x` release; `etcd` from `go.etcd.io/etcd/server/v3` at the
//! version that release is tested with; and the reference CNI plugins the
//! node runtime chains first (`ptp`, `host-local`, `loopback`) from
//! `github.com/containernetworking/plugins`, built as its `build_linux.sh`
//! builds them (plus the version stamp its release builds set). For each module a `go.mod` is
//! generated in the cache (k8s.io/kubernetes's own `replace` directives point
//! into its repository's `staging/` tree, which a module that requires it
//! does not get, so ours names each staging module's release instead), `go
//! mod tidy` fills in `go.sum`, and `go build` builds each command as
//! upstream's `hack/lib/golang.sh` does: static (`CGO_ENABLED=0`),
//! `-trimpath`, tags `selinux,notest,grpcnotrace`, `-s -w`, and the version
//! stamped through `-X k8s.io/component-base/version.*` (and client-go's) so
//! `/version` and `kubectl version` report the release.
//!
//! The cache: `${ISTIO_RS_CACHE:-$HOME/.cache/istio-rs}/k8s/<release>-<recipe
//! hash>/` holds the generated modules (`src/`) and `bin/`. Each binary is
//! linked to a temporary name and renamed, so a binary in `bin/` is whole;
//! [`COMPLETE_MARKER`] is written last, and a directory with it is used as it
//! is, without running Go. One build at a time per directory (a lock file
//! beside it). The build's Go module and build caches are its own,
//! `<directory>.go/` beside it (not the user's `GOMODCACHE`/`GOCACHE`): an
//! interrupted build resumes from them, and they are removed once the
//! directory is complete: several GB that a finished cache never reads
//! again, on CI machines whose disk is small.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The environment variable overriding the cache's root.
pub const CACHE_ENV: &str = "ISTIO_RS_CACHE";
/// Written into `bin/` once every binary is there.
pub const COMPLETE_MARKER: &str = ".complete";

/// Bump when the way binaries are built changes without a version changing
/// (flags, tags, the generated go.mod): a new cache directory follows.
const RECIPE_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "the Kubernetes control-plane binaries are not built in {dir}; run `cargo xtask k8s build` \
         (the first build takes many minutes)"
    )]
    NotBuilt { dir: PathBuf },
    #[error(
        "no Go toolchain: `go` is not on PATH and {fallback} does not exist; Go is needed to build \
         the Kubernetes control plane for the tests (install Go {go_directive} or newer)"
    )]
    NoGo {
        fallback: &'static str,
        go_directive: String,
    },
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` (in {dir}) failed ({status}){hint}")]
    Go {
        command: String,
        dir: PathBuf,
        status: std::process::ExitStatus,
        hint: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Module { path: PathBuf, reason: String },
    #[error("the cache directory cannot be found: set {CACHE_ENV} or HOME")]
    NoCacheRoot,
}

/// A Go module the components come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Module {
    Kubernetes,
    Etcd,
    CniPlugins,
}

impl Module {
    fn dir_name(self) -> &'static str {
        match self {
            Module::Kubernetes => "kubernetes",
            Module::Etcd => "etcd",
            Module::CniPlugins => "cni-plugins",
        }
    }
}

/// One binary: its name in `bin/`, the module and package it is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Component {
    pub name: &'static str,
    pub module: Module,
    pub package: &'static str,
}

/// What is built, and from which module versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipe {
    /// The `k8s.io/kubernetes` release (`v1.36.3`).
    pub kubernetes: String,
    /// The release of every `k8s.io/*` staging module (`v0.36.3`).
    pub staging: String,
    /// The `go.etcd.io/etcd/server/v3` release.
    pub etcd: String,
    /// The `github.com/containernetworking/plugins` release.
    pub cni_plugins: String,
    /// The `sigs.k8s.io/gateway-api` release whose standard-channel CRDs
    /// the tests install (not built: copied from the module).
    pub gateway_api: String,
}

/// Every binary, in build order (the API server first: it compiles most of
/// what the others share).
pub const COMPONENTS: &[Component] = &[
    Component {
        name: "etcd",
        module: Module::Etcd,
        package: "go.etcd.io/etcd/server/v3",
    },
    Component {
        name: "kube-apiserver",
        module: Module::Kubernetes,
        package: "k8s.io/kubernetes/cmd/kube-apiserver",
    },
    Component {
        name: "kube-controller-manager",
        module: Module::Kubernetes,
        package: "k8s.io/kubernetes/cmd/kube-controller-manager",
    },
    Component {
        name: "kube-scheduler",
        module: Module::Kubernetes,
        package: "k8s.io/kubernetes/cmd/kube-scheduler",
    },
    Component {
        name: "kubectl",
        module: Module::Kubernetes,
        package: "k8s.io/kubernetes/cmd/kubectl",
    },
    Component {
        name: "kube-proxy",
        module: Module::Kubernetes,
        package: "k8s.io/kubernetes/cmd/kube-proxy",
    },
    Component {
        name: "ptp",
        module: Module::CniPlugins,
        package: "github.com/containernetworking/plugins/plugins/main/ptp",
    },
    Component {
        name: "host-local",
        module: Module::CniPlugins,
        package: "github.com/containernetworking/plugins/plugins/ipam/host-local",
    },
    Component {
        name: "loopback",
        module: Module::CniPlugins,
        package: "github.com/containernetworking/plugins/plugins/main/loopback",
    },
];

/// The CNI plugins among [`COMPONENTS`] (names as `type` in a CNI config).
pub const CNI_PLUGINS: &[&str] = &["ptp", "host-local", "loopback"];

/// Build tags upstream's release builds use (`hack/lib/golang.sh`).
const TAGS: &str = "selinux,notest,grpcnotrace";
/// Where Go is installed when it is not on PATH.
const GO_FALLBACK: &str = "/usr/local/go/bin/go";

impl Default for Recipe {
    /// Kubernetes 1.36.3, its staging modules at v0.36.3, and etcd 3.6.8: the
    /// etcd version k8s.io/kubernetes v1.36.3 pins in
    /// `build/dependencies.yaml`. Gateway API v1.5.1: the release the
    /// `gateway-api` crate istiod-rs reads it with is generated from. The
    /// CNI plugins at their newest release the module proxy serves (v1.10.0).
    fn default() -> Self {
        Recipe {
            kubernetes: "v1.36.3".into(),
            staging: "v0.36.3".into(),
            etcd: "v3.6.8".into(),
            cni_plugins: "v1.10.0".into(),
            gateway_api: "v1.5.1".into(),
        }
    }
}

impl Recipe {
    /// A short hash of everything that decides what is built.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!(
            "format {RECIPE_FORMAT}\nkubernetes {}\nstaging {}\netcd {}\ncni-plugins {}\ngateway-api {}\ntags {TAGS}\n",
            self.kubernetes, self.staging, self.etcd, self.cni_plugins, self.gateway_api
        ));
        for c in COMPONENTS {
            h.update(format!("{} {:?} {}\n", c.name, c.module, c.package));
        }
        hex::encode(h.finalize())[..12].to_string()
    }

    /// `<release>-<hash>`: the cache directory's name.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.kubernetes, self.hash())
    }

    /// `(major, minor)` of the Kubernetes release: `("1", "36")`.
    fn major_minor(&self) -> (&str, &str) {
        let v = self.kubernetes.trim_start_matches('v');
        let mut parts = v.split('.');
        (parts.next().unwrap_or(""), parts.next().unwrap_or(""))
    }

    /// The `-ldflags` for a component: stripped, with Kubernetes' version
    /// variables set (`build_date` is the release's publication time).
    fn ldflags(&self, module: Module, build_date: &str) -> String {
        let mut flags = vec!["-s".to_string(), "-w".to_string()];
        if module == Module::Kubernetes {
            let (major, minor) = self.major_minor();
            for package in [
                "k8s.io/client-go/pkg/version",
                "k8s.io/component-base/version",
            ] {
                for (var, value) in [
                    ("gitVersion", self.kubernetes.as_str()),
                    ("gitMajor", major),
                    ("gitMinor", minor),
                    ("gitTreeState", "clean"),
                    // Not known from a module: empty rather than a placeholder.
                    ("gitCommit", ""),
                    ("buildDate", build_date),
                ] {
                    flags.push(format!("-X {package}.{var}={value}"));
                }
            }
        }
        if module == Module::CniPlugins {
            // What `<plugin> VERSION`-less invocations print (`CNI ptp plugin v1.10.0`).
            flags.push(format!(
                "-X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion={}",
                self.cni_plugins
            ));
        }
        flags.join(" ")
    }
}

/// The built binaries' paths, and the Gateway API CRDs of the recipe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeBinaries {
    pub dir: PathBuf,
    /// The standard channel's CRD files (`gateway.networking.k8s.io_*.yaml`).
    pub gateway_api_crds: PathBuf,
}

impl KubeBinaries {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn etcd(&self) -> PathBuf {
        self.path("etcd")
    }
    pub fn kube_apiserver(&self) -> PathBuf {
        self.path("kube-apiserver")
    }
    pub fn kube_controller_manager(&self) -> PathBuf {
        self.path("kube-controller-manager")
    }
    pub fn kube_scheduler(&self) -> PathBuf {
        self.path("kube-scheduler")
    }
    pub fn kubectl(&self) -> PathBuf {
        self.path("kubectl")
    }
    pub fn kube_proxy(&self) -> PathBuf {
        self.path("kube-proxy")
    }
    /// A reference CNI plugin (one of [`CNI_PLUGINS`]).
    pub fn cni_plugin(&self, name: &str) -> PathBuf {
        self.path(name)
    }
}

/// The cache directory of one recipe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cache {
    pub recipe: Recipe,
    pub dir: PathBuf,
}

/// `${ISTIO_RS_CACHE:-$HOME/.cache/istio-rs}`.
pub fn cache_root() -> Result<PathBuf, BuildError> {
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or(BuildError::NoCacheRoot)?;
    Ok(Path::new(&home).join(".cache").join("istio-rs"))
}

/// How one build went, for the caller to print.
#[derive(Clone, Debug, Default)]
pub struct BuildReport {
    /// `true` when the cache was complete and nothing ran.
    pub reused: bool,
    /// Each binary built in this call and how long its `go build` took.
    pub built: Vec<(String, Duration)>,
    /// Module resolution (`go mod download` / `go mod tidy`).
    pub resolve: Duration,
    pub total: Duration,
}

impl Cache {
    pub fn new(recipe: Recipe) -> Result<Cache, BuildError> {
        let dir = cache_root()?.join("k8s").join(recipe.dir_name());
        Ok(Cache { recipe, dir })
    }

    /// The default recipe's cache.
    pub fn default_recipe() -> Result<Cache, BuildError> {
        Cache::new(Recipe::default())
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    /// The Gateway API standard channel's CRDs.
    pub fn gateway_api_dir(&self) -> PathBuf {
        self.dir.join("gateway-api").join("standard")
    }

    /// `<dir>.lock`, beside the cache directory (whose name has dots in it:
    /// the release).
    fn lock_path(&self) -> PathBuf {
        let mut name = self.dir.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        self.dir.with_file_name(name)
    }

    /// `<dir>.go`, beside the cache directory: the build's own Go module
    /// and build caches, removed once the directory is complete.
    fn go_dir(&self) -> PathBuf {
        let mut name = self.dir.file_name().unwrap_or_default().to_os_string();
        name.push(".go");
        self.dir.with_file_name(name)
    }

    fn marker(&self) -> PathBuf {
        self.bin_dir().join(COMPLETE_MARKER)
    }

    /// Whether every binary is built and the CRDs are there (the marker is
    /// written last).
    pub fn is_complete(&self) -> bool {
        self.marker().is_file()
            && COMPONENTS
                .iter()
                .all(|c| self.bin_dir().join(c.name).is_file())
            && self.gateway_api_dir().is_dir()
    }

    /// The binaries, if built; never runs Go.
    pub fn binaries(&self) -> Result<KubeBinaries, BuildError> {
        if self.is_complete() {
            Ok(KubeBinaries {
                dir: self.bin_dir(),
                gateway_api_crds: self.gateway_api_dir(),
            })
        } else {
            Err(BuildError::NotBuilt {
                dir: self.dir.clone(),
            })
        }
    }

    /// Builds what is missing (everything, the first time), unless the
    /// cache is complete. Go's output goes to this process's stderr; `say`
    /// hears one line per step.
    pub fn build(&self, say: &dyn Fn(&str)) -> Result<(KubeBinaries, BuildReport), BuildError> {
        let start = Instant::now();
        let reused = || {
            let report = BuildReport {
                reused: true,
                total: start.elapsed(),
                ..BuildReport::default()
            };
            self.binaries().map(|b| (b, report))
        };
        if self.is_complete() {
            return reused();
        }
        create_dir(&self.dir)?;
        let _lock = lock(&self.lock_path(), say)?;
        // Another process may have finished it while this one waited.
        if self.is_complete() {
            return reused();
        }
        let go = Go::find(&self.recipe, self.go_dir())?;
        say(&format!(
            "building the Kubernetes control plane {} (etcd {}) into {} with {}",
            self.recipe.kubernetes,
            self.recipe.etcd,
            self.dir.display(),
            go.program.display()
        ));
        let resolve_start = Instant::now();
        let kubernetes = self.prepare_kubernetes(&go, say)?;
        let etcd = self.prepare_etcd(&go, say)?;
        let cni_plugins = self.prepare_cni_plugins(&go, say)?;
        if !self.gateway_api_dir().is_dir() {
            self.copy_gateway_api_crds(&go, say)?;
        }
        let resolve = resolve_start.elapsed();
        say(&format!(
            "modules resolved in {}",
            human(resolve.as_secs_f64())
        ));

        let bin = self.bin_dir();
        create_dir(&bin)?;
        let mut report = BuildReport {
            resolve,
            ..BuildReport::default()
        };
        for c in COMPONENTS {
            let target = bin.join(c.name);
            if target.is_file() {
                say(&format!("{}: already built", c.name));
                continue;
            }
            let (module_dir, ldflags) = match c.module {
                Module::Kubernetes => (&kubernetes.dir, &kubernetes.ldflags),
                Module::Etcd => (&etcd.dir, &etcd.ldflags),
                Module::CniPlugins => (&cni_plugins.dir, &cni_plugins.ldflags),
            };
            say(&format!("{}: go build {}", c.name, c.package));
            let tmp = bin.join(format!(".{}.tmp", c.name));
            let began = Instant::now();
            go.run(
                module_dir,
                &[
                    "build",
                    "-trimpath",
                    "-buildvcs=false",
                    "-tags",
                    TAGS,
                    "-ldflags",
                    ldflags,
                    "-o",
                    &tmp.to_string_lossy(),
                    c.package,
                ],
                "",
            )?;
            fs::rename(&tmp, &target).map_err(|source| BuildError::Io {
                what: "could not move the built binary to",
                path: target.clone(),
                source,
            })?;
            let took = began.elapsed();
            say(&format!(
                "{}: built in {}",
                c.name,
                human(took.as_secs_f64())
            ));
            report.built.push((c.name.to_string(), took));
        }
        report.total = start.elapsed();
        let mut marker = format!(
            "kubernetes {}\nstaging {}\netcd {}\ncni-plugins {}\ngateway-api {}\ngo {}\nrecipe {}\n",
            self.recipe.kubernetes,
            self.recipe.staging,
            self.recipe.etcd,
            self.recipe.cni_plugins,
            self.recipe.gateway_api,
            go.version,
            self.recipe.hash()
        );
        for (name, took) in &report.built {
            marker.push_str(&format!("built {name} {:.0}s\n", took.as_secs_f64()));
        }
        write(&self.marker(), &marker)?;
        go.discard_caches(say);
        Ok((self.binaries()?, report))
    }

    /// Generates the module that builds the Kubernetes commands and
    /// resolves its dependencies.
    fn prepare_kubernetes(&self, go: &Go, say: &dyn Fn(&str)) -> Result<Prepared, BuildError> {
        let r = &self.recipe;
        let module = format!("k8s.io/kubernetes@{}", r.kubernetes);
        say(&format!("resolving {module}"));
        let info = go.download(&self.dir, &module)?;
        let upstream_mod = read(&info.go_mod)?;
        let staging = staging_modules(&upstream_mod);
        if staging.is_empty() {
            return Err(BuildError::Module {
                path: info.go_mod,
                reason: "no `k8s.io/... => ./staging/src/...` replace directive: not a k8s.io/kubernetes go.mod?".into(),
            });
        }
        let go_directive = go_directive(&upstream_mod).unwrap_or("1.26.0");
        let packages: Vec<&str> = COMPONENTS
            .iter()
            .filter(|c| c.module == Module::Kubernetes)
            .map(|c| c.package)
            .collect();
        let text = kubernetes_go_mod(r, go_directive, &staging, &packages);
        let dir = self.dir.join("src").join(Module::Kubernetes.dir_name());
        self.tidy(go, &dir, &text, say)?;
        Ok(Prepared {
            dir,
            ldflags: r.ldflags(Module::Kubernetes, &info.time),
        })
    }

    /// Generates the module that builds etcd and resolves its dependencies.
    fn prepare_etcd(&self, go: &Go, say: &dyn Fn(&str)) -> Result<Prepared, BuildError> {
        let r = &self.recipe;
        let package = COMPONENTS
            .iter()
            .find(|c| c.module == Module::Etcd)
            .map(|c| c.package)
            .expect("etcd is a component");
        say(&format!("resolving {package}@{}", r.etcd));
        let text = format!(
            "// Generated by e2e::kube::build (`cargo xtask k8s build`): etcd from its\n\
             // server module, as Kubernetes {} is tested with.\n\
             module istio-rs.local/etcd\n\n\
             go 1.24\n\n\
             require {package} {}\n\n\
             tool {package}\n",
            r.kubernetes, r.etcd
        );
        let dir = self.dir.join("src").join(Module::Etcd.dir_name());
        self.tidy(go, &dir, &text, say)?;
        Ok(Prepared {
            dir,
            ldflags: r.ldflags(Module::Etcd, ""),
        })
    }

    /// Generates the module that builds the reference CNI plugins and
    /// resolves its dependencies.
    fn prepare_cni_plugins(&self, go: &Go, say: &dyn Fn(&str)) -> Result<Prepared, BuildError> {
        let r = &self.recipe;
        say(&format!(
            "resolving github.com/containernetworking/plugins@{}",
            r.cni_plugins
        ));
        let packages: Vec<&str> = COMPONENTS
            .iter()
            .filter(|c| c.module == Module::CniPlugins)
            .map(|c| c.package)
            .collect();
        let text = cni_plugins_go_mod(r, &packages);
        let dir = self.dir.join("src").join(Module::CniPlugins.dir_name());
        self.tidy(go, &dir, &text, say)?;
        Ok(Prepared {
            dir,
            ldflags: r.ldflags(Module::CniPlugins, ""),
        })
    }

    /// Copies the standard channel's CRDs out of the `sigs.k8s.io/gateway-api`
    /// module (`config/crd/standard/`, CustomResourceDefinitions only) into
    /// [`Cache::gateway_api_dir`], through a temporary directory.
    fn copy_gateway_api_crds(&self, go: &Go, say: &dyn Fn(&str)) -> Result<(), BuildError> {
        let module = format!("sigs.k8s.io/gateway-api@{}", self.recipe.gateway_api);
        say(&format!(
            "Gateway API CRDs (standard channel) from {module}"
        ));
        let downloaded = go.download(&self.dir, &module)?;
        let source = downloaded.dir.join("config").join("crd").join("standard");
        let target = self.gateway_api_dir();
        let tmp = target.with_extension("tmp");
        let _ = fs::remove_dir_all(&tmp);
        create_dir(&tmp)?;
        let entries = fs::read_dir(&source).map_err(|e| BuildError::Io {
            what: "could not list",
            path: source.clone(),
            source: e,
        })?;
        let mut copied = 0;
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("gateway.networking.k8s.io_") || !name.ends_with(".yaml") {
                continue;
            }
            let text = read(&entry.path())?;
            if text.contains("kind: CustomResourceDefinition") {
                write(&tmp.join(&name), &text)?;
                copied += 1;
            }
        }
        if copied == 0 {
            return Err(BuildError::Module {
                path: source,
                reason: "no CustomResourceDefinition in the standard channel".into(),
            });
        }
        fs::rename(&tmp, &target).map_err(|e| BuildError::Io {
            what: "could not move the CRDs to",
            path: target,
            source: e,
        })
    }

    /// Writes `go.mod` (when it differs: a re-run keeps the tidied file)
    /// and runs `go mod tidy`, which fills in requirements and `go.sum`.
    fn tidy(
        &self,
        go: &Go,
        dir: &Path,
        go_mod: &str,
        say: &dyn Fn(&str),
    ) -> Result<(), BuildError> {
        create_dir(dir)?;
        let path = dir.join("go.mod");
        let seed = dir.join("go.mod.generated");
        if fs::read_to_string(&seed).ok().as_deref() != Some(go_mod) || !path.is_file() {
            write(&path, go_mod)?;
            let _ = fs::remove_file(dir.join("go.sum"));
            write(&seed, go_mod)?;
        }
        say(&format!("go mod tidy in {}", dir.display()));
        go.run(
            dir,
            &["mod", "tidy"],
            "; the Go module proxy (GOPROXY) must be reachable for a first build",
        )
    }
}

struct Prepared {
    dir: PathBuf,
    ldflags: String,
}

/// What `go mod download -json` says about a module.
struct Downloaded {
    /// Where the module's files are (read-only, in Go's module cache).
    dir: PathBuf,
    go_mod: PathBuf,
    /// The release's publication time (RFC 3339), Kubernetes' buildDate.
    time: String,
}

/// The Go command.
struct Go {
    program: PathBuf,
    version: String,
    /// Holds `GOMODCACHE` (`mod/`) and `GOCACHE` (`build/`) of the build.
    caches: PathBuf,
}

impl Go {
    fn find(recipe: &Recipe, caches: PathBuf) -> Result<Go, BuildError> {
        let on_path = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("go"))
                .find(|p| p.is_file())
        });
        let program = match on_path {
            Some(p) => p,
            None if Path::new(GO_FALLBACK).is_file() => PathBuf::from(GO_FALLBACK),
            None => {
                return Err(BuildError::NoGo {
                    fallback: GO_FALLBACK,
                    go_directive: format!("for k8s.io/kubernetes {}", recipe.kubernetes),
                });
            }
        };
        let out = Command::new(&program)
            .args(["env", "GOVERSION"])
            .output()
            .map_err(|source| BuildError::Spawn {
                command: format!("{} env GOVERSION", program.display()),
                source,
            })?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(Go {
            program,
            version,
            caches,
        })
    }

    fn command(&self, dir: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.current_dir(dir)
            .args(args)
            // Static binaries: no C toolchain needed, nothing linked from the host.
            .env("CGO_ENABLED", "0")
            .env("GOMODCACHE", self.caches.join("mod"))
            .env("GOCACHE", self.caches.join("build"))
            .stdin(Stdio::null());
        cmd
    }

    /// Removes the build's module and build caches. `go clean -modcache`
    /// first: Go makes the module cache read-only. A failure is said, not
    /// fatal: the binaries are built.
    fn discard_caches(&self, say: &dyn Fn(&str)) {
        let cleaned = self
            .command(Path::new("/"), &["clean", "-modcache"])
            .env("GO111MODULE", "on")
            .env("GOWORK", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let removed = match cleaned {
            Ok(s) if s.success() => fs::remove_dir_all(&self.caches),
            Ok(s) => Err(std::io::Error::other(format!("go clean -modcache: {s}"))),
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => say(&format!(
                "removed the build's Go caches {}",
                self.caches.display()
            )),
            Err(e) => say(&format!(
                "warning: could not remove the build's Go caches {}: {e}",
                self.caches.display()
            )),
        }
    }

    /// Runs a go command, its output on our stderr.
    fn run(&self, dir: &Path, args: &[&str], hint: &str) -> Result<(), BuildError> {
        let mut cmd = self.command(dir, args);
        cmd.stdout(std::io::stderr());
        let shown = format!("go {}", args.join(" "));
        let status = cmd.status().map_err(|source| BuildError::Spawn {
            command: shown.clone(),
            source,
        })?;
        if !status.success() {
            return Err(BuildError::Go {
                command: shown,
                dir: dir.to_path_buf(),
                status,
                hint: if hint.is_empty() {
                    "; its output is above".into()
                } else {
                    format!("{hint}; its output is above")
                },
            });
        }
        Ok(())
    }

    /// `go mod download -json module@version`, outside any module.
    fn download(&self, cache_dir: &Path, module: &str) -> Result<Downloaded, BuildError> {
        let mut cmd = self.command(cache_dir, &["mod", "download", "-json", module]);
        // Outside a module: GOFLAGS=-mod=... or a go.work must not interfere.
        cmd.env("GO111MODULE", "on").env("GOWORK", "off");
        let shown = format!("go mod download -json {module}");
        let out = cmd.output().map_err(|source| BuildError::Spawn {
            command: shown.clone(),
            source,
        })?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let error = json
            .get("Error")
            .and_then(|e| e.as_str())
            .map(str::to_string);
        if !out.status.success() || error.is_some() {
            return Err(BuildError::Go {
                command: shown,
                dir: cache_dir.to_path_buf(),
                status: out.status,
                hint: format!(
                    ": {}{}",
                    error.unwrap_or_default(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        let field = |name: &str| {
            json.get(name)
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .ok_or_else(|| BuildError::Module {
                    path: cache_dir.to_path_buf(),
                    reason: format!("`{shown}` gave no {name}"),
                })
        };
        let dir = PathBuf::from(field("Dir")?);
        let go_mod = PathBuf::from(field("GoMod")?);
        let info = PathBuf::from(field("Info")?);
        let info_json: serde_json::Value =
            serde_json::from_str(&read(&info)?).map_err(|e| BuildError::Module {
                path: info.clone(),
                reason: e.to_string(),
            })?;
        let time = info_json
            .get("Time")
            .and_then(|t| t.as_str())
            .unwrap_or("1970-01-01T00:00:00Z")
            .to_string();
        Ok(Downloaded { dir, go_mod, time })
    }
}

/// The staging modules a k8s.io/kubernetes go.mod replaces with its own
/// `./staging/src/k8s.io/<name>` directories.
pub fn staging_modules(go_mod: &str) -> Vec<String> {
    let mut modules: Vec<String> = go_mod
        .lines()
        .filter_map(|line| {
            let line = line.trim().trim_start_matches("replace").trim();
            let (from, to) = line.split_once("=>")?;
            let from = from.split_whitespace().next()?;
            let to = to.trim();
            (from.starts_with("k8s.io/") && to.starts_with("./staging/src/k8s.io/"))
                .then(|| from.to_string())
        })
        .collect();
    modules.sort();
    modules.dedup();
    modules
}

/// The `go` directive of a go.mod (`1.26.0`).
fn go_directive(go_mod: &str) -> Option<&str> {
    go_mod
        .lines()
        .find_map(|l| l.trim().strip_prefix("go "))
        .map(str::trim)
}

/// Our module requiring k8s.io/kubernetes at the release, every staging
/// module replaced by its release, and the commands as tools (so `go mod
/// tidy` resolves exactly what they import).
pub fn kubernetes_go_mod(
    recipe: &Recipe,
    go_directive: &str,
    staging: &[String],
    packages: &[&str],
) -> String {
    let mut text = format!(
        "// Generated by e2e::kube::build (`cargo xtask k8s build`): Kubernetes {}\n\
         // commands from the k8s.io/kubernetes module, every staging module at {}.\n\
         module istio-rs.local/kubernetes\n\n\
         go {go_directive}\n\n\
         require k8s.io/kubernetes {}\n\nreplace (\n",
        recipe.kubernetes, recipe.staging, recipe.kubernetes
    );
    for m in staging {
        text.push_str(&format!("\t{m} => {m} {}\n", recipe.staging));
    }
    text.push_str(")\n\ntool (\n");
    for p in packages {
        text.push_str(&format!("\t{p}\n"));
    }
    text.push_str(")\n");
    text
}

/// Our module requiring the CNI plugins' release, the plugins as tools.
pub fn cni_plugins_go_mod(recipe: &Recipe, packages: &[&str]) -> String {
    let mut text = format!(
        "// Generated by e2e::kube::build (`cargo xtask k8s build`): the reference\n\
         // CNI plugins the node runtime chains first.\n\
         module istio-rs.local/cni-plugins\n\n\
         go 1.24\n\n\
         require github.com/containernetworking/plugins {}\n\ntool (\n",
        recipe.cni_plugins
    );
    for p in packages {
        text.push_str(&format!("\t{p}\n"));
    }
    text.push_str(")\n");
    text
}

/// An exclusive lock on `path`, held until dropped; says so when it waits.
fn lock(path: &Path, say: &dyn Fn(&str)) -> Result<nix::fcntl::Flock<fs::File>, BuildError> {
    use nix::fcntl::{Flock, FlockArg};
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|source| BuildError::Io {
            what: "could not open the lock file",
            path: path.to_path_buf(),
            source,
        })?;
    let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => return Ok(locked),
        Err((file, _)) => file,
    };
    say(&format!(
        "another build holds {}; waiting for it",
        path.display()
    ));
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| BuildError::Io {
        what: "could not lock",
        path: path.to_path_buf(),
        source: std::io::Error::from(errno),
    })
}

fn create_dir(path: &Path) -> Result<(), BuildError> {
    fs::create_dir_all(path).map_err(|source| BuildError::Io {
        what: "could not create directory",
        path: path.to_path_buf(),
        source,
    })
}

fn read(path: &Path) -> Result<String, BuildError> {
    fs::read_to_string(path).map_err(|source| BuildError::Io {
        what: "could not read",
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, text: &str) -> Result<(), BuildError> {
    fs::File::create(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|source| BuildError::Io {
            what: "could not write",
            path: path.to_path_buf(),
            source,
        })
}

/// `95s` -> `1m35s`.
pub fn human(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{secs:.1}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPSTREAM: &str = "module k8s.io/kubernetes\n\ngo 1.26.0\n\nrequire (\n\tk8s.io/api v0.0.0\n)\n\n\
        replace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\tk8s.io/kubectl => ./staging/src/k8s.io/kubectl\n\
        \tgithub.com/x/y => github.com/x/y v1.0.0\n)\n";

    #[test]
    fn staging_modules_come_from_the_replace_directives() {
        assert_eq!(
            staging_modules(UPSTREAM),
            vec!["k8s.io/api", "k8s.io/kubectl"]
        );
        assert_eq!(go_directive(UPSTREAM), Some("1.26.0"));
        // A one-line replace counts too.
        assert_eq!(
            staging_modules("replace k8s.io/api => ./staging/src/k8s.io/api\n"),
            vec!["k8s.io/api"]
        );
    }

    #[test]
    fn the_generated_go_mod_pins_every_staging_module() {
        let r = Recipe::default();
        let text = kubernetes_go_mod(
            &r,
            "1.26.0",
            &staging_modules(UPSTREAM),
            &["k8s.io/kubernetes/cmd/kubectl"],
        );
        assert!(
            text.contains("require k8s.io/kubernetes v1.36.3\n"),
            "{text}"
        );
        assert!(
            text.contains("\tk8s.io/api => k8s.io/api v0.36.3\n"),
            "{text}"
        );
        assert!(
            text.contains("\tk8s.io/kubectl => k8s.io/kubectl v0.36.3\n"),
            "{text}"
        );
        assert!(
            text.contains("tool (\n\tk8s.io/kubernetes/cmd/kubectl\n)"),
            "{text}"
        );
    }

    #[test]
    fn versions_are_stamped_into_kubernetes_binaries_only() {
        let r = Recipe::default();
        let flags = r.ldflags(Module::Kubernetes, "2026-07-22T18:07:38Z");
        assert!(flags.contains("-X k8s.io/component-base/version.gitVersion=v1.36.3"));
        assert!(flags.contains("-X k8s.io/client-go/pkg/version.gitMinor=36"));
        assert!(flags.contains("-X k8s.io/component-base/version.buildDate=2026-07-22T18:07:38Z"));
        assert_eq!(r.ldflags(Module::Etcd, ""), "-s -w");
        assert_eq!(
            r.ldflags(Module::CniPlugins, ""),
            "-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=v1.10.0"
        );
        let go_mod = cni_plugins_go_mod(
            &r,
            &["github.com/containernetworking/plugins/plugins/main/ptp"],
        );
        assert!(
            go_mod.contains("require github.com/containernetworking/plugins v1.10.0\n"),
            "{go_mod}"
        );
        assert!(
            go_mod.contains("tool (\n\tgithub.com/containernetworking/plugins/plugins/main/ptp\n)"),
            "{go_mod}"
        );
    }

    #[test]
    fn the_cache_directory_names_release_and_recipe() {
        let a = Recipe::default();
        let mut b = a.clone();
        b.etcd = "v3.6.16".into();
        let mut c = a.clone();
        c.cni_plugins = "v1.9.1".into();
        assert!(a.dir_name().starts_with("v1.36.3-"));
        assert_eq!(a.hash().len(), 12);
        assert_ne!(a.hash(), b.hash());
        assert_ne!(a.hash(), c.hash());
        assert_eq!(a.hash(), Recipe::default().hash());
    }

    #[test]
    fn an_incomplete_cache_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache {
            recipe: Recipe::default(),
            dir: dir.path().join("c"),
        };
        assert!(matches!(cache.binaries(), Err(BuildError::NotBuilt { .. })));
        fs::create_dir_all(cache.bin_dir()).unwrap();
        for c in COMPONENTS {
            fs::write(cache.bin_dir().join(c.name), b"").unwrap();
        }
        fs::create_dir_all(cache.gateway_api_dir()).unwrap();
        // Every binary, but no marker: a build that died before the end.
        assert!(!cache.is_complete());
        fs::write(cache.bin_dir().join(COMPLETE_MARKER), b"").unwrap();
        assert_eq!(
            cache.lock_path(),
            dir.path().join("c.lock"),
            "one lock per cache directory"
        );
        let release = Cache {
            recipe: Recipe::default(),
            dir: dir.path().join("v1.36.3-abc"),
        };
        assert_eq!(release.lock_path(), dir.path().join("v1.36.3-abc.lock"));
        assert_eq!(
            cache.binaries().unwrap().kubectl(),
            cache.bin_dir().join("kubectl")
        );
    }
}
