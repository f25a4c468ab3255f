//! A PKCS#11 module for tests only: it forwards every call to a real module (SoftHSM,
//! Kryoptic) and injects the faults a control file asks for, so tests can show what the
//! service does when its HSM misbehaves. Nothing in the service knows it exists; a test
//! points `KMS_HSM_MODULE` at this library.
//!
//! - `PKCS11_FAULTS_MODULE`: the real module's path.
//! - `PKCS11_FAULTS_CONTROL`: the control file, re-read on every call. One rule per line:
//!   `<function|*> <action> [times N]`, where the action is a return code
//!   (`CKR_DEVICE_ERROR`, or a number such as `0x30`), `hang <milliseconds>` (sleep,
//!   then forward the call), `logout` (really log the application out, then answer
//!   CKR_USER_NOT_LOGGED_IN) or `close-sessions` (really close every session of the
//!   slot, then answer CKR_SESSION_CLOSED). Without `times` a rule holds until the file
//!   changes; `*` matches every function but C_Initialize and C_Finalize. The first
//!   matching rule that has calls left applies. Writing the file anew resets the counts;
//!   an empty file clears every fault.
//! - Every fault injected is appended to `<control file>.log` as `<function> <action>`,
//!   so a test can tell its fault really happened.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use cryptoki_sys::*;

struct Real {
    list: CK_FUNCTION_LIST,
    _library: libloading::Library,
}

static REAL: OnceLock<Result<Real, String>> = OnceLock::new();
static LIST: OnceLock<CK_FUNCTION_LIST> = OnceLock::new();

fn load_real() -> Result<Real, String> {
    let path = std::env::var("PKCS11_FAULTS_MODULE")
        .map_err(|_| "PKCS11_FAULTS_MODULE is not set".to_owned())?;
    // SAFETY: loading a PKCS#11 module runs its initialisers; that is what it is for.
    let library = unsafe { libloading::Library::new(&path) }.map_err(|e| e.to_string())?;
    // SAFETY: C_GetFunctionList has this signature in every PKCS#11 module.
    let get: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
        unsafe { library.get(b"C_GetFunctionList\0") }.map_err(|e| e.to_string())?;
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: `list` is a valid out pointer; the module keeps its list alive while loaded.
    let rv = unsafe { get(&mut list) };
    if rv != CKR_OK || list.is_null() {
        return Err(format!("C_GetFunctionList of {path} returned {rv:#x}"));
    }
    // SAFETY: checked non-null above; the list is plain data.
    let list = unsafe { *list };
    Ok(Real {
        list,
        _library: library,
    })
}

fn real() -> Option<&'static CK_FUNCTION_LIST> {
    REAL.get_or_init(load_real)
        .as_ref()
        .ok()
        .map(|real| &real.list)
}

/// The module's one entry point: the real module's list with every forwarded function
/// replaced by its fault-injecting twin.
///
/// # Safety
/// `list` must be a valid pointer to write the list's address to.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    if list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    let Some(real) = real() else {
        return CKR_GENERAL_ERROR;
    };
    let ours = LIST.get_or_init(|| {
        let mut ours = *real;
        install(&mut ours);
        ours
    });
    // SAFETY: checked non-null; callers only read the list.
    unsafe { *list = ours as *const CK_FUNCTION_LIST as *mut CK_FUNCTION_LIST };
    CKR_OK
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Fail(CK_RV),
    Hang(Duration),
    Logout,
    CloseSessions,
}

struct Rule {
    function: String,
    action: Action,
    remaining: Option<u64>,
    text: String,
}

#[derive(Default)]
struct Control {
    seen: Option<String>,
    rules: Vec<Rule>,
}

static CONTROL: Mutex<Control> = Mutex::new(Control {
    seen: None,
    rules: Vec::new(),
});

/// Functions a `*` rule leaves alone: the module must stay loadable and unloadable.
const EXEMPT_FROM_ANY: [&str; 2] = ["C_Initialize", "C_Finalize"];

fn return_code(name: &str) -> Option<CK_RV> {
    let known = [
        ("CKR_GENERAL_ERROR", CKR_GENERAL_ERROR),
        ("CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED),
        ("CKR_DEVICE_ERROR", CKR_DEVICE_ERROR),
        ("CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY),
        ("CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED),
        ("CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT),
        ("CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID),
        ("CKR_SESSION_CLOSED", CKR_SESSION_CLOSED),
        ("CKR_USER_NOT_LOGGED_IN", CKR_USER_NOT_LOGGED_IN),
        ("CKR_KEY_HANDLE_INVALID", CKR_KEY_HANDLE_INVALID),
        ("CKR_OBJECT_HANDLE_INVALID", CKR_OBJECT_HANDLE_INVALID),
        (
            "CKR_WRAPPING_KEY_HANDLE_INVALID",
            CKR_WRAPPING_KEY_HANDLE_INVALID,
        ),
        (
            "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
            CKR_UNWRAPPING_KEY_HANDLE_INVALID,
        ),
        ("CKR_CRYPTOKI_NOT_INITIALIZED", CKR_CRYPTOKI_NOT_INITIALIZED),
        ("CKR_OPERATION_ACTIVE", CKR_OPERATION_ACTIVE),
    ];
    if let Some((_, rv)) = known.iter().find(|(known, _)| *known == name) {
        return Some(*rv);
    }
    let hex = name.strip_prefix("0x")?;
    CK_RV::from_str_radix(hex, 16).ok()
}

fn parse(text: &str) -> Vec<Rule> {
    let mut rules = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&function, rest)) = words.split_first() else {
            continue;
        };
        let (action, rest) = match rest {
            ["hang", ms, rest @ ..] => match ms.parse() {
                Ok(ms) => (Action::Hang(Duration::from_millis(ms)), rest),
                Err(_) => continue,
            },
            ["logout", rest @ ..] => (Action::Logout, rest),
            ["close-sessions", rest @ ..] => (Action::CloseSessions, rest),
            [code, rest @ ..] => match return_code(code) {
                Some(rv) => (Action::Fail(rv), rest),
                None => continue,
            },
            [] => continue,
        };
        let remaining = match rest {
            ["times", n] => match n.parse() {
                Ok(n) => Some(n),
                Err(_) => continue,
            },
            [] => None,
            _ => continue,
        };
        rules.push(Rule {
            function: function.to_owned(),
            action,
            remaining,
            text: rest_of(line),
        });
    }
    rules
}

/// The rule's action as written, for the log.
fn rest_of(line: &str) -> String {
    line.split_whitespace()
        .skip(1)
        .take_while(|w| *w != "times")
        .collect::<Vec<_>>()
        .join(" ")
}

/// The action the control file asks for on this call, counted; `None` forwards it.
fn next_action(function: &str) -> Option<Action> {
    let path = std::env::var_os("PKCS11_FAULTS_CONTROL")?;
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut control = CONTROL.lock().unwrap_or_else(|e| e.into_inner());
    if control.seen.as_deref() != Some(text.as_str()) {
        control.rules = parse(&text);
        control.seen = Some(text);
    }
    let rule = control.rules.iter_mut().find(|rule| {
        let matches = rule.function == function
            || (rule.function == "*" && !EXEMPT_FROM_ANY.contains(&function));
        matches && rule.remaining != Some(0)
    })?;
    if let Some(remaining) = rule.remaining.as_mut() {
        *remaining -= 1;
    }
    let action = rule.action;
    let mut log_path = path;
    log_path.push(".log");
    if let Ok(mut log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
    {
        let _ = writeln!(log, "{function} {}", rule.text);
    }
    Some(action)
}

/// Applies the control file to one call: `Some(rv)` answers it, `None` forwards it.
fn inject(function: &str, session: Option<CK_SESSION_HANDLE>) -> Option<CK_RV> {
    match next_action(function)? {
        Action::Fail(rv) => Some(rv),
        Action::Hang(time) => {
            std::thread::sleep(time);
            None
        }
        Action::Logout => {
            if let (Some(session), Some(logout)) = (session, real().and_then(|l| l.C_Logout)) {
                // SAFETY: forwarding the caller's own session handle.
                unsafe { logout(session) };
            }
            Some(CKR_USER_NOT_LOGGED_IN)
        }
        Action::CloseSessions => {
            if let Some(session) = session {
                close_all_sessions_of(session);
            }
            Some(CKR_SESSION_CLOSED)
        }
    }
}

fn close_all_sessions_of(session: CK_SESSION_HANDLE) {
    let Some(list) = real() else { return };
    let (Some(info), Some(close_all)) = (list.C_GetSessionInfo, list.C_CloseAllSessions) else {
        return;
    };
    // SAFETY: CK_SESSION_INFO is plain data, written by the module.
    let mut session_info: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer; the handle is the caller's.
    if unsafe { info(session, &mut session_info) } == CKR_OK {
        // SAFETY: the slot the caller's session belongs to.
        unsafe { close_all(session_info.slotID) };
    }
}

/// Defines each forwarding function and `install`, which puts them in a function list.
macro_rules! forward {
    ($( $kind:ident $name:ident ( $first:ident : $first_ty:ty $(, $arg:ident : $ty:ty)* ); )*) => {
        mod twins {
            use super::*;
            $(
                #[allow(non_snake_case)]
                pub(super) unsafe extern "C" fn $name($first: $first_ty $(, $arg: $ty)*) -> CK_RV {
                    if let Some(rv) = inject(stringify!($name), forward!(@session $kind $first)) {
                        return rv;
                    }
                    match real().and_then(|list| list.$name) {
                        // SAFETY: the caller's arguments, passed on unchanged.
                        Some(function) => unsafe { function($first $(, $arg)*) },
                        None => CKR_FUNCTION_NOT_SUPPORTED,
                    }
                }
            )*
        }

        fn install(list: &mut CK_FUNCTION_LIST) {
            $( list.$name = Some(twins::$name); )*
        }
    };
    (@session session $first:ident) => { Some($first) };
    (@session global $first:ident) => { { let _ = &$first; None } };
}

forward! {
    global C_Initialize(init_args: *mut std::ffi::c_void);
    global C_Finalize(reserved: *mut std::ffi::c_void);
    global C_GetSlotList(token_present: CK_BBOOL, slots: *mut CK_SLOT_ID, count: *mut CK_ULONG);
    global C_GetSlotInfo(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO);
    global C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO);
    global C_GetMechanismList(slot: CK_SLOT_ID, mechanisms: *mut CK_MECHANISM_TYPE, count: *mut CK_ULONG);
    global C_GetMechanismInfo(slot: CK_SLOT_ID, mechanism: CK_MECHANISM_TYPE, info: *mut CK_MECHANISM_INFO);
    global C_OpenSession(slot: CK_SLOT_ID, flags: CK_FLAGS, application: *mut std::ffi::c_void, notify: CK_NOTIFY, session: *mut CK_SESSION_HANDLE);
    session C_CloseSession(session: CK_SESSION_HANDLE);
    global C_CloseAllSessions(slot: CK_SLOT_ID);
    session C_GetSessionInfo(session: CK_SESSION_HANDLE, info: *mut CK_SESSION_INFO);
    session C_Login(session: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: *mut CK_UTF8CHAR, pin_len: CK_ULONG);
    session C_Logout(session: CK_SESSION_HANDLE);
    session C_CreateObject(session: CK_SESSION_HANDLE, template: *mut CK_ATTRIBUTE, count: CK_ULONG, object: *mut CK_OBJECT_HANDLE);
    session C_DestroyObject(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE);
    session C_GetAttributeValue(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, template: *mut CK_ATTRIBUTE, count: CK_ULONG);
    session C_FindObjectsInit(session: CK_SESSION_HANDLE, template: *mut CK_ATTRIBUTE, count: CK_ULONG);
    session C_FindObjects(session: CK_SESSION_HANDLE, objects: *mut CK_OBJECT_HANDLE, max: CK_ULONG, count: *mut CK_ULONG);
    session C_FindObjectsFinal(session: CK_SESSION_HANDLE);
    session C_EncryptInit(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
    session C_Encrypt(session: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    session C_DecryptInit(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
    session C_Decrypt(session: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    session C_GenerateKey(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, template: *mut CK_ATTRIBUTE, count: CK_ULONG, key: *mut CK_OBJECT_HANDLE);
    session C_GenerateKeyPair(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, public: *mut CK_ATTRIBUTE, public_count: CK_ULONG, private: *mut CK_ATTRIBUTE, private_count: CK_ULONG, public_key: *mut CK_OBJECT_HANDLE, private_key: *mut CK_OBJECT_HANDLE);
    session C_WrapKey(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, wrapping: CK_OBJECT_HANDLE, key: CK_OBJECT_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    session C_UnwrapKey(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, unwrapping: CK_OBJECT_HANDLE, wrapped: *mut CK_BYTE, wrapped_len: CK_ULONG, template: *mut CK_ATTRIBUTE, count: CK_ULONG, key: *mut CK_OBJECT_HANDLE);
    session C_GenerateRandom(session: CK_SESSION_HANDLE, out: *mut CK_BYTE, len: CK_ULONG);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse() {
        let rules = parse(
            "# comment\nC_Encrypt CKR_DEVICE_ERROR times 3\n* hang 250\nC_Login logout\n\
             C_Decrypt 0x30\nC_Sign nonsense\nC_Encrypt close-sessions times x\n",
        );
        assert_eq!(rules.len(), 4);
        assert!(matches!(rules[0].action, Action::Fail(CKR_DEVICE_ERROR)));
        assert_eq!(rules[0].remaining, Some(3));
        assert_eq!(rules[0].text, "CKR_DEVICE_ERROR");
        assert!(matches!(rules[1].action, Action::Hang(d) if d == Duration::from_millis(250)));
        assert!(matches!(rules[2].action, Action::Logout));
        assert!(matches!(rules[3].action, Action::Fail(0x30)));
    }
}
