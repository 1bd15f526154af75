//! virtio-console (`--console`) and virtio-rng (`--rng`), each a virtio-pci function on segment 0
//! as upstream puts them (`__console` before the disks, `__rng` after them), each served by its
//! own I/O thread under the `StreamIo` seccomp filter. Their saved state is their virtio-pci
//! function's (queues, features, vectors); a restore rebuilds the device over the same output
//! or a newly opened entropy source, so the guest's driver continues without a reset.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::console_io::{open_output_file, LossyOutput, Pty};
use devices::pci::PciBdf;
use devices::virtio::{
    Console, ConsoleOutput, Rng, VirtioDevice, VirtioPciDevice, VirtioPciState, VirtioTransport,
};

use super::{lock_or_recover, DeviceManager};
use crate::config::{ConsoleConfig, ConsoleOutputMode, RngConfig};
use crate::pci_segment::KvmMsiInterrupts;
use crate::Error;

/// `vm.info`'s id of the virtio-console device (upstream's).
pub const CONSOLE_DEVICE_ID: &str = "__console";
/// `vm.info`'s id of the virtio-rng device (upstream's).
pub const RNG_DEVICE_ID: &str = "__rng";

/// Builds the device a function carries, again for each restore.
type Rebuild = Box<dyn Fn() -> Result<Box<dyn VirtioDevice>, Error> + Send + Sync>;

/// A virtio device on its own virtio-pci function.
pub(super) struct PciVirtioSlot {
    pub id: &'static str,
    device: Arc<Mutex<VirtioPciDevice>>,
    bdf: PciBdf,
    msi: Arc<KvmMsiInterrupts>,
    rebuild: Rebuild,
}

impl PciVirtioSlot {
    pub fn with_transport<R>(&self, step: impl FnOnce(&mut dyn VirtioTransport) -> R) -> R {
        step(&mut *lock_or_recover(&self.device))
    }

    pub fn state(&self) -> Result<VirtioPciState, Error> {
        lock_or_recover(&self.device)
            .state()
            .map_err(|e| Error::device_state(self.id, e))
    }
}

/// The console's and the rng's functions, when the VM has them.
#[derive(Default)]
pub(super) struct ConsoleRng {
    pub console: Option<PciVirtioSlot>,
    pub rng: Option<PciVirtioSlot>,
    /// `--console pty`: the terminal the console writes to, its path reported by `vm.info`.
    pub console_pty: Option<Pty>,
}

impl ConsoleRng {
    pub fn slots(&self) -> impl Iterator<Item = &PciVirtioSlot> {
        self.console.iter().chain(self.rng.iter())
    }
}

/// An opened output and, for `pty`, its terminal.
pub(super) type OpenedOutput = (Box<dyn Write + Send>, Option<Pty>);

/// Where a `--serial` or `--console` writes: `None` for `off`; a pty also comes back so its path
/// can be reported. Every output is lossy: what cannot be written is dropped and counted, never
/// retried on the thread that wrote it. `file_error` names a `file=` that cannot be opened.
pub(super) fn open_console_output(
    option: &'static str,
    config: &ConsoleConfig,
    file_error: impl FnOnce(PathBuf, io::Error) -> Error,
) -> Result<Option<OpenedOutput>, Error> {
    let output: Box<dyn Write + Send> = match config.mode {
        ConsoleOutputMode::Off => return Ok(None),
        ConsoleOutputMode::Null => Box::new(io::sink()),
        ConsoleOutputMode::Tty => {
            Box::new(LossyOutput::new(io::stdout(), format!("{option} output")))
        }
        ConsoleOutputMode::File => {
            let path = config
                .file
                .as_ref()
                .ok_or_else(|| Error::Device(format!("--{option} file= without a path")))?;
            let file = open_output_file(Path::new(path))
                .map_err(|source| file_error(PathBuf::from(path), source))?;
            Box::new(LossyOutput::new(file, format!("{option} output {path}")))
        }
        ConsoleOutputMode::Pty => {
            // A `file` in the config is the pty of an earlier run (upstream reports it there):
            // a new one is opened every time.
            let what = format!("--{option} pty");
            let opened = Pty::open().map_err(|e| Error::device(what.clone(), e))?;
            let main = opened.main().map_err(|e| Error::device(what, e))?;
            // The operator needs the path to attach, so it is logged at the default level.
            match option {
                "serial" => log::warn!(
                    "--serial pty: the guest's serial port is on {}",
                    opened.path().display()
                ),
                _ => log::warn!(
                    "--{option} pty: {} is the guest's virtio-console",
                    opened.path().display()
                ),
            }
            let what = format!("{option} pty {}", opened.path().display());
            return Ok(Some((Box::new(LossyOutput::new(main, what)), Some(opened))));
        }
        ConsoleOutputMode::Socket => {
            return Err(Error::Device(format!(
                "--{option} socket= is not supported (use off, null, pty, tty or file=)"
            )))
        }
    };
    Ok(Some((output, None)))
}

impl DeviceManager {
    /// `--console`: a virtio-console function whose transmit queue writes to the terminal, a
    /// file (created 0600, truncated, as upstream), a pty, or nowhere (`null`); none with `off`.
    pub(super) fn add_virtio_console(&mut self, config: &ConsoleConfig) -> Result<(), Error> {
        let Some((output, pty)) = open_console_output("console", config, |path, source| {
            Error::device(format!("--console file={}", path.display()), source)
        })?
        else {
            return Ok(());
        };
        let output: ConsoleOutput = Arc::new(Mutex::new(output));
        let rebuild: Rebuild =
            Box::new(move || Ok(Box::new(Console::new(output.clone())) as Box<dyn VirtioDevice>));
        let slot = self.add_pci_stream_function(CONSOLE_DEVICE_ID, rebuild)?;
        log::info!("virtio-console ({:?}) at {}", config.mode, slot.bdf);
        self.console_rng.console = Some(slot);
        self.console_rng.console_pty = pty;
        Ok(())
    }

    /// `--rng src=PATH`: a virtio-rng function reading from PATH (upstream always has one, on
    /// `/dev/urandom` by default). A source that cannot be read fails the VM's creation.
    pub(super) fn add_virtio_rng(&mut self, config: &RngConfig) -> Result<(), Error> {
        let src = PathBuf::from(&config.src);
        let rebuild: Rebuild = Box::new(move || {
            let rng = Rng::open(&src).map_err(|e| Error::device("--rng", e))?;
            Ok(Box::new(rng) as Box<dyn VirtioDevice>)
        });
        let slot = self.add_pci_stream_function(RNG_DEVICE_ID, rebuild)?;
        log::info!("virtio-rng on {} at {}", config.src, slot.bdf);
        self.console_rng.rng = Some(slot);
        Ok(())
    }

    fn add_pci_stream_function(
        &self,
        id: &'static str,
        rebuild: Rebuild,
    ) -> Result<PciVirtioSlot, Error> {
        let (device, bdf, msi) =
            self.add_pci_virtio(id, id, rebuild()?, &self.stream_thread_start)?;
        Ok(PciVirtioSlot {
            id,
            device,
            bdf,
            msi,
            rebuild,
        })
    }

    /// Rebuilds `slot`'s function from `saved` (paused, activated if it was running); its
    /// configuration space comes back with the segment's state, its ioeventfds after it.
    pub(super) fn restore_pci_virtio(
        &self,
        slot: &PciVirtioSlot,
        saved: &VirtioPciState,
    ) -> Result<(), Error> {
        self.restore_pci_function(
            slot.id,
            &slot.device,
            &slot.msi,
            (slot.rebuild)()?,
            saved,
            &self.stream_thread_start,
        )
    }

    /// Restores the console's and rng's functions; a device saved but absent now (or the other
    /// way round) is reported and left at reset, as the serial port is.
    pub(super) fn restore_console_rng(
        &self,
        console: Option<&VirtioPciState>,
        rng: Option<&VirtioPciState>,
    ) -> Result<(), Error> {
        for (slot, saved) in [
            (self.console_rng.console.as_ref(), console),
            (self.console_rng.rng.as_ref(), rng),
        ] {
            match (slot, saved) {
                (Some(slot), Some(saved)) => self.restore_pci_virtio(slot, saved)?,
                (Some(slot), None) => {
                    log::warn!("saved state has no {}; it starts at reset", slot.id)
                }
                (None, Some(_)) => log::warn!("saved console or rng state dropped: not in this VM"),
                (None, None) => {}
            }
        }
        Ok(())
    }

    /// Registers the rebuilt functions' queue-notify ioeventfds (after the segment's restore).
    pub(super) fn refresh_console_rng_ioeventfds(&self) -> Result<(), Error> {
        for slot in self.console_rng.slots() {
            self.pci.refresh_ioeventfds(slot.bdf)?;
        }
        Ok(())
    }
}
