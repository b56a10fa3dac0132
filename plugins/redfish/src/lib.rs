//! `redfish`: the generic Redfish driver. It works on the first ComputerSystem: power by
//! the system's own `#ComputerSystem.Reset` target, with a reset type the BMC lists as
//! allowed; the next boot by PATCHing `Boot.BootSourceOverride{Target,Enabled,Mode}` with
//! the system's ETag in If-Match (one retry when the resource changed in between). A BMC
//! that answers 503, or says the system is in POST (HPE iLO's
//! `UnableToModifyDuringSystemPOST`), gets "retry later". The host adds authentication
//! and checks the certificate; this driver only ever names paths.

wit_bindgen::generate!({ path: "../../wit", world: "bmc-driver" });

use arges::plugin::bmc::{BootDevice, Protocol};
use arges::plugin::http::{self, Request, Response};
use serde_json::{Value, json};

struct Redfish;

fn send(
    method: &str,
    path: &str,
    body: Option<Value>,
    if_match: Option<&str>,
) -> Result<Response, DriverError> {
    let headers = if_match
        .map(|t| vec![("if-match".to_string(), t.to_string())])
        .unwrap_or_default();
    http::send(&Request {
        method: method.into(),
        path: path.into(),
        headers,
        body: body.map(|b| b.to_string().into_bytes()),
    })
    .map_err(DriverError::Failed)
}

fn json(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A non-2xx answer as a driver error.
fn refusal(what: &str, r: &Response) -> DriverError {
    let body = json(r);
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ids: Vec<&str> = body["error"]["@Message.ExtendedInfo"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["MessageId"].as_str()).collect())
        .unwrap_or_default();
    let text = format!("{what} answered {}: {message} {ids:?}", r.status);
    if r.status == 503 || ids.iter().any(|i| i.contains("DuringSystemPOST")) {
        DriverError::RetryLater(text)
    } else if r.status == 501 || r.status == 405 {
        DriverError::Unsupported(text)
    } else {
        DriverError::Failed(text)
    }
}

fn get(path: &str) -> Result<(Value, Option<String>), DriverError> {
    let r = send("GET", path, None, None)?;
    if !(200..300).contains(&r.status) {
        return Err(refusal(&format!("GET {path}"), &r));
    }
    Ok((json(&r), header(&r, "etag").map(String::from)))
}

/// The first ComputerSystem's path.
fn system() -> Result<String, DriverError> {
    let (systems, _) = get("/redfish/v1/Systems")?;
    systems["Members"][0]["@odata.id"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| DriverError::Failed("the BMC lists no ComputerSystem".into()))
}

impl Guest for Redfish {
    fn probe(bmc: BmcInfo) -> u32 {
        if bmc.protocol != Protocol::Redfish {
            return 0;
        }
        match get("/redfish/v1") {
            Ok((root, _)) if root["Systems"].is_object() => 10,
            _ => 0,
        }
    }

    fn power_state() -> Result<PowerState, DriverError> {
        let (sys, _) = get(&system()?)?;
        // A transition counts as not there yet.
        match sys["PowerState"].as_str() {
            Some("On") | Some("PoweringOff") => Ok(PowerState::On),
            Some("Off") | Some("PoweringOn") => Ok(PowerState::Off),
            other => Err(DriverError::Failed(format!("PowerState is {other:?}"))),
        }
    }

    fn set_power(action: PowerAction) -> Result<(), DriverError> {
        let path = system()?;
        let (sys, _) = get(&path)?;
        let reset = &sys["Actions"]["#ComputerSystem.Reset"];
        let target = reset["target"]
            .as_str()
            .ok_or_else(|| DriverError::Unsupported("the system has no Reset action".into()))?;
        let allowed: Vec<&str> = reset["ResetType@Redfish.AllowableValues"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let wanted: &[&str] = match action {
            PowerAction::On => &["On", "ForceOn"],
            PowerAction::Off => &["ForceOff"],
            PowerAction::SoftOff => &["GracefulShutdown"],
            PowerAction::Cycle => &["PowerCycle"],
            PowerAction::Reset => &["ForceRestart", "GracefulRestart"],
        };
        // No list means the BMC did not say: try the first.
        let Some(kind) = wanted
            .iter()
            .find(|w| allowed.is_empty() || allowed.contains(w))
        else {
            return Err(DriverError::Unsupported(format!(
                "none of {wanted:?} is among the allowed reset types {allowed:?}"
            )));
        };
        let r = send("POST", target, Some(json!({"ResetType": kind})), None)?;
        match r.status {
            200..=299 => Ok(()),
            // Listed but refused (sushy-emulator does this for PowerCycle): the host
            // composes a cycle from off and on.
            400 | 501 if action == PowerAction::Cycle => Err(DriverError::Unsupported(format!(
                "{kind} refused with {}",
                r.status
            ))),
            _ => Err(refusal(&format!("POST {target} {kind}"), &r)),
        }
    }

    fn set_boot_device(setting: BootSetting) -> Result<(), DriverError> {
        let path = system()?;
        let target = match setting.device {
            BootDevice::Pxe => "Pxe",
            BootDevice::Disk => "Hdd",
            BootDevice::Bios => "BiosSetup",
            BootDevice::Cdrom => "Cd",
        };
        let patch = json!({"Boot": {
            "BootSourceOverrideTarget": target,
            "BootSourceOverrideEnabled": if setting.persistent { "Continuous" } else { "Once" },
            "BootSourceOverrideMode": if setting.efi { "UEFI" } else { "Legacy" },
        }});
        for attempt in 0..2 {
            let (_, etag) = get(&path)?;
            let r = send("PATCH", &path, Some(patch.clone()), etag.as_deref())?;
            match r.status {
                200..=299 => return Ok(()),
                // 412: changed since we read it; 428: it wants If-Match. Read again once.
                412 | 428 if attempt == 0 => continue,
                _ => return Err(refusal(&format!("PATCH {path}"), &r)),
            }
        }
        Err(DriverError::RetryLater(
            "the boot override kept conflicting".into(),
        ))
    }

    fn boot_device() -> Result<Option<BootSetting>, DriverError> {
        let (sys, _) = get(&system()?)?;
        let boot = &sys["Boot"];
        let enabled = boot["BootSourceOverrideEnabled"]
            .as_str()
            .unwrap_or("Disabled");
        if enabled == "Disabled" {
            return Ok(None);
        }
        let device = match boot["BootSourceOverrideTarget"].as_str() {
            Some("Pxe") => BootDevice::Pxe,
            Some("Hdd") => BootDevice::Disk,
            Some("BiosSetup") => BootDevice::Bios,
            Some("Cd") => BootDevice::Cdrom,
            _ => return Ok(None),
        };
        Ok(Some(BootSetting {
            device,
            persistent: enabled == "Continuous",
            efi: boot["BootSourceOverrideMode"].as_str() == Some("UEFI"),
        }))
    }
}

export!(Redfish);
