//! CPU and memory of the platform's processes and of the harness itself.

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use crate::LoadtestError;
use crate::live::ProcessSample;

/// Samples a fixed set of processes. CPU is measured between two refreshes, so the first
/// sample of each process reads 0 %.
pub struct Sampler {
    system: System,
    processes: Vec<(String, Pid)>,
}

impl Sampler {
    pub fn new(processes: &[(String, u32)]) -> Result<Sampler, LoadtestError> {
        let mut sampler = Sampler {
            system: System::new().map_err(|e| LoadtestError::Resources(e.to_string()))?,
            processes: processes
                .iter()
                .map(|(name, pid)| (name.clone(), Pid::from_u32(*pid)))
                .collect(),
        };
        sampler.sample();
        Ok(sampler)
    }

    pub fn sample(&mut self) -> Vec<ProcessSample> {
        let pids: Vec<Pid> = self.processes.iter().map(|(_, pid)| *pid).collect();
        self.system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&pids),
            true,
            ProcessRefreshKind::nothing().with_memory().with_cpu(),
        );
        self.processes
            .iter()
            .filter_map(|(name, pid)| {
                let process = self.system.process(*pid)?;
                Some(ProcessSample {
                    name: name.clone(),
                    rss_bytes: process.memory(),
                    cpu_percent: process.cpu_usage(),
                    cpu_ms: process.accumulated_cpu_time(),
                })
            })
            .collect()
    }
}

/// `(name, pid)` of this process's children whose name is one of `names`.
pub fn children_named(names: &[&str]) -> Vec<(String, u32)> {
    let me = Pid::from_u32(std::process::id());
    let Ok(mut system) = System::new() else {
        return Vec::new();
    };
    system.refresh_processes_specifics(ProcessesToUpdate::All, true, ProcessRefreshKind::nothing());
    let mut found: Vec<(String, u32)> = system
        .processes()
        .values()
        .filter(|p| p.parent() == Some(me))
        .filter_map(|p| {
            let name = p.name().to_string_lossy();
            names
                .iter()
                .find(|n| name.starts_with(*n))
                .map(|n| ((*n).to_owned(), p.pid().as_u32()))
        })
        .collect();
    found.sort();
    found
}

/// Cores, memory and OS of this machine.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Machine {
    pub host: String,
    pub os: String,
    pub cores: usize,
    pub memory_bytes: u64,
}

impl Machine {
    pub fn describe() -> Machine {
        let memory_bytes = System::new().map_or(0, |mut system| {
            system.refresh_memory();
            system.total_memory()
        });
        Machine {
            host: System::host_name().unwrap_or_default(),
            os: System::long_os_version().unwrap_or_default(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_sampled() {
        let mut sampler = Sampler::new(&[("harness".to_owned(), std::process::id())]).unwrap();
        let samples = sampler.sample();
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].name, "harness");
        assert!(samples[0].rss_bytes > 1024 * 1024, "{samples:?}");
    }
}
