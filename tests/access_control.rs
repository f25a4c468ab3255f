//! Who may do what, through gRPC against the real server: every RPC for every kind of
//! caller (no token, an unknown token, a revoked token, Viewer, Editor, Administrator,
//! Administrator on `*`, a role in another instance only), each checked for its exact
//! code; allowed calls checked to have worked; and every one of those calls found on
//! the audit trail with the right principal, instance, operation, key, code,
//! correlation id and peer.

mod common;

use std::collections::HashMap;

use common::{TestServer, TestToken, bearer, create_principal, instance, kms_token, req};
use kms::api::Rpc;
use kms::cli::connect::AuthedChannel;
use kms::proto::audit_service_client::AuditServiceClient;
use kms::proto::backup_service_client::BackupServiceClient;
use kms::proto::import_token_service_client::ImportTokenServiceClient;
use kms::proto::key_service_client::KeyServiceClient;
use kms::proto::*;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// What a caller is, for the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Caller {
    NoToken,
    UnknownToken,
    RevokedToken,
    Viewer,
    Editor,
    Administrator,
    WildcardAdministrator,
    OtherInstanceOnly,
}

const CALLERS: [Caller; 8] = [
    Caller::NoToken,
    Caller::UnknownToken,
    Caller::RevokedToken,
    Caller::Viewer,
    Caller::Editor,
    Caller::Administrator,
    Caller::WildcardAdministrator,
    Caller::OtherInstanceOnly,
];

impl Caller {
    /// The principal the audit trail should name.
    fn principal(self) -> &'static str {
        match self {
            Caller::NoToken | Caller::UnknownToken | Caller::RevokedToken => "anonymous",
            Caller::Viewer => "viewer",
            Caller::Editor => "editor",
            Caller::Administrator => "administrator",
            Caller::WildcardAdministrator => "admin",
            Caller::OtherInstanceOnly => "elsewhere",
        }
    }

    fn expected(self, rpc: Rpc) -> Code {
        use kms::auth::Role;
        let held = match self {
            Caller::NoToken | Caller::UnknownToken | Caller::RevokedToken => {
                return Code::Unauthenticated;
            }
            Caller::OtherInstanceOnly => return Code::PermissionDenied,
            Caller::Viewer => Role::Viewer,
            Caller::Editor => Role::Editor,
            Caller::Administrator | Caller::WildcardAdministrator => Role::Administrator,
        };
        // A backup holds every instance: the role in this one is not enough.
        if rpc == Rpc::ExportBackup && self != Caller::WildcardAdministrator {
            return Code::PermissionDenied;
        }
        if held >= rpc.required_role() {
            Code::Ok
        } else {
            Code::PermissionDenied
        }
    }
}

struct Fixture {
    channel: Channel,
    tenant: String,
    tokens: HashMap<Caller, Option<String>>,
    admin: String,
    /// Authenticated as admin, for fixtures.
    admin_keys: KeyServiceClient<AuthedChannel>,
}

impl Fixture {
    fn request<T>(&self, caller: Caller, message: T, correlation: &str) -> Request<T> {
        let mut request = req(&self.tenant, message);
        if let Some(Some(token)) = self.tokens.get(&caller) {
            request = bearer(request, token);
        }
        request.metadata_mut().insert(
            "correlation-id",
            MetadataValue::try_from(correlation).unwrap(),
        );
        request
    }

    fn admin<T>(&self, message: T) -> Request<T> {
        bearer(req(&self.tenant, message), &self.admin)
    }

    fn keys(&self) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(self.channel.clone())
    }

    async fn root_key(&self) -> String {
        self.created(CreateKeyRequest {
            name: "fixture".into(),
            ..Default::default()
        })
        .await
    }

    /// A key made by admin; its id.
    async fn created(&self, request: CreateKeyRequest) -> String {
        common::create_key(&mut self.admin_keys.clone(), &self.tenant, request)
            .await
            .id
    }

    async fn ciphertext(&self, key: &str) -> Vec<u8> {
        self.keys()
            .wrap_key(self.admin(WrapKeyRequest {
                id: key.into(),
                plaintext: Some(b"matrix data key".to_vec()),
                aad: vec![],
            }))
            .await
            .unwrap()
            .into_inner()
            .ciphertext
    }

    async fn external_key(&self) -> String {
        self.created(CreateKeyRequest {
            name: "external".into(),
            origin: KeyOrigin::External as i32,
            ..Default::default()
        })
        .await
    }

    /// An EXTERNAL key's import parameters and material encrypted for them.
    async fn material_for(&self, key: &str) -> ImportKeyMaterialRequest {
        let parameters = self
            .keys()
            .get_parameters_for_import(self.admin(GetParametersForImportRequest {
                key_id: key.into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let mut material = [0u8; 32];
        getrandom::fill(&mut material).unwrap();
        let encrypted = kms::hsm::encrypt_oaep(
            &parameters.public_key,
            kms::hsm::oaep::OaepHash::Sha256,
            &material,
        )
        .unwrap();
        ImportKeyMaterialRequest {
            key_id: key.into(),
            import_token: parameters.import_token,
            encrypted_key_material: encrypted,
            expiration_model: ExpirationModel::KeyMaterialDoesNotExpire as i32,
            valid_to: None,
        }
    }

    /// Makes `rpc` as `caller` with a request that is valid when the call is allowed
    /// (fixtures made by admin first); returns the code and the key the call concerned.
    async fn call(&self, rpc: Rpc, caller: Caller, correlation: &str) -> (Code, Option<String>) {
        let allowed = caller.expected(rpc) == Code::Ok;
        let mut keys = self.keys();
        macro_rules! key_call {
            ($method:ident, $message:expr, $key:expr) => {{
                let request = self.request(caller, $message, correlation);
                let key: Option<String> = $key;
                let code = match keys.$method(request).await {
                    Ok(_) => Code::Ok,
                    Err(status) => status.code(),
                };
                (code, key)
            }};
        }
        // Refused calls never reach validation, so they need no fixtures.
        let needs_key = !matches!(
            rpc,
            Rpc::CreateKey
                | Rpc::ListKeys
                | Rpc::CountKeys
                | Rpc::CreateImportToken
                | Rpc::GetImportToken
                | Rpc::ListAuditEvents
                | Rpc::ExportBackup
        );
        let key = if allowed && needs_key {
            match rpc {
                Rpc::GetParametersForImport
                | Rpc::ImportKeyMaterial
                | Rpc::DeleteImportedKeyMaterial => self.external_key().await,
                _ => self.root_key().await,
            }
        } else {
            uuid::Uuid::new_v4().to_string()
        };
        match rpc {
            Rpc::CreateKey => {
                let response = keys
                    .create_key(self.request(
                        caller,
                        CreateKeyRequest {
                            name: "by-matrix".into(),
                            ..Default::default()
                        },
                        correlation,
                    ))
                    .await;
                match response {
                    Ok(r) => (Code::Ok, Some(r.into_inner().key.unwrap().id)),
                    Err(status) => (status.code(), None),
                }
            }
            Rpc::GetKey => key_call!(get_key, GetKeyRequest { id: key.clone() }, Some(key)),
            Rpc::ListKeys => key_call!(list_keys, ListKeysRequest::default(), None),
            Rpc::CountKeys => key_call!(count_keys, CountKeysRequest::default(), None),
            Rpc::WrapKey => key_call!(
                wrap_key,
                WrapKeyRequest {
                    id: key.clone(),
                    plaintext: None,
                    aad: vec![],
                },
                Some(key)
            ),
            Rpc::UnwrapKey | Rpc::RewrapKey => {
                let ciphertext = if allowed {
                    self.ciphertext(&key).await
                } else {
                    vec![1, 2, 3]
                };
                if rpc == Rpc::UnwrapKey {
                    key_call!(
                        unwrap_key,
                        UnwrapKeyRequest {
                            id: key.clone(),
                            ciphertext,
                            aad: vec![],
                        },
                        Some(key)
                    )
                } else {
                    key_call!(
                        rewrap_key,
                        RewrapKeyRequest {
                            id: key.clone(),
                            ciphertext,
                            aad: vec![],
                        },
                        Some(key)
                    )
                }
            }
            Rpc::RotateKey => key_call!(
                rotate_key,
                RotateKeyRequest {
                    id: key.clone(),
                    ..Default::default()
                },
                Some(key)
            ),
            Rpc::ListKeyVersions => key_call!(
                list_key_versions,
                ListKeyVersionsRequest {
                    id: key.clone(),
                    ..Default::default()
                },
                Some(key)
            ),
            Rpc::DisableKey => {
                key_call!(
                    disable_key,
                    DisableKeyRequest { id: key.clone() },
                    Some(key)
                )
            }
            Rpc::EnableKey => {
                if allowed {
                    keys.disable_key(self.admin(DisableKeyRequest { id: key.clone() }))
                        .await
                        .unwrap();
                }
                key_call!(enable_key, EnableKeyRequest { id: key.clone() }, Some(key))
            }
            Rpc::DeleteKey => {
                key_call!(delete_key, DeleteKeyRequest { id: key.clone() }, Some(key))
            }
            Rpc::GetParametersForImport => key_call!(
                get_parameters_for_import,
                GetParametersForImportRequest {
                    key_id: key.clone(),
                    ..Default::default()
                },
                Some(key)
            ),
            Rpc::ImportKeyMaterial => {
                let message = if allowed {
                    self.material_for(&key).await
                } else {
                    ImportKeyMaterialRequest {
                        key_id: key.clone(),
                        ..Default::default()
                    }
                };
                key_call!(import_key_material, message, Some(key))
            }
            Rpc::DeleteImportedKeyMaterial => {
                if allowed {
                    let material = self.material_for(&key).await;
                    keys.import_key_material(self.admin(material))
                        .await
                        .unwrap();
                }
                key_call!(
                    delete_imported_key_material,
                    DeleteImportedKeyMaterialRequest {
                        key_id: key.clone()
                    },
                    Some(key)
                )
            }
            Rpc::CreateImportToken => {
                let mut tokens = ImportTokenServiceClient::new(self.channel.clone());
                let code = match tokens
                    .create_import_token(self.request(
                        caller,
                        CreateImportTokenRequest {
                            expiration: None,
                            max_allowed_retrievals: Some(500),
                        },
                        correlation,
                    ))
                    .await
                {
                    Ok(_) => Code::Ok,
                    Err(status) => status.code(),
                };
                (code, None)
            }
            Rpc::GetImportToken => {
                let mut tokens = ImportTokenServiceClient::new(self.channel.clone());
                let code = match tokens
                    .get_import_token(self.request(caller, GetImportTokenRequest {}, correlation))
                    .await
                {
                    Ok(_) => Code::Ok,
                    Err(status) => status.code(),
                };
                (code, None)
            }
            Rpc::ListAuditEvents => {
                let mut audit = AuditServiceClient::new(self.channel.clone());
                let code = match audit
                    .list_audit_events(self.request(
                        caller,
                        ListAuditEventsRequest::default(),
                        correlation,
                    ))
                    .await
                {
                    Ok(_) => Code::Ok,
                    Err(status) => status.code(),
                };
                (code, None)
            }
            Rpc::ExportBackup => {
                let mut backup = BackupServiceClient::new(self.channel.clone());
                let code = match backup
                    .export_backup(self.request(caller, ExportBackupRequest {}, correlation))
                    .await
                {
                    // The backup is read to its end, so the call is whole.
                    Ok(response) => {
                        let mut chunks = response.into_inner();
                        let mut bytes = 0;
                        while let Some(chunk) = chunks.message().await.unwrap() {
                            bytes += chunk.data.len();
                        }
                        assert!(bytes > 0);
                        Code::Ok
                    }
                    Err(status) => status.code(),
                };
                (code, None)
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_for_every_kind_of_caller_and_every_call_on_the_audit_trail() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let tenant = instance();
    let dir = data.path();
    // The principals exist before the server starts, except the revoked one, which is
    // revoked while it runs and dropped on SIGHUP.
    std::fs::create_dir_all(dir).unwrap();
    let mut tokens = HashMap::new();
    tokens.insert(Caller::NoToken, None);
    tokens.insert(
        Caller::UnknownToken,
        Some(
            kms::auth::BearerToken::generate()
                .unwrap()
                .expose()
                .to_owned(),
        ),
    );
    for (caller, name, role) in [
        (Caller::Viewer, "viewer", "Viewer"),
        (Caller::Editor, "editor", "Editor"),
        (Caller::Administrator, "administrator", "Administrator"),
        (Caller::RevokedToken, "revoked", "Administrator"),
    ] {
        let role = format!("{tenant}={role}");
        tokens.insert(caller, Some(create_principal(dir, name, &[&role])));
    }
    tokens.insert(
        Caller::OtherInstanceOnly,
        Some(create_principal(
            dir,
            "elsewhere",
            &["other-tenant=Administrator"],
        )),
    );
    let server = TestServer::start_with_env(&token, dir, &[]).await;
    tokens.insert(
        Caller::WildcardAdministrator,
        Some(server.admin_token.clone()),
    );

    // The revoked principal works until the revocation reaches the server.
    let fixture = Fixture {
        channel: server.channel().await,
        tenant: tenant.clone(),
        tokens,
        admin: server.admin_token.clone(),
        admin_keys: server.keys().await,
    };
    let (code, _) = fixture
        .call(
            Rpc::CountKeys,
            Caller::Administrator,
            &uuid::Uuid::new_v4().to_string(),
        )
        .await;
    assert_eq!(code, Code::Ok);
    let before = fixture.tokens[&Caller::RevokedToken].clone().unwrap();
    let mut keys = fixture.keys();
    keys.count_keys(bearer(req(&tenant, CountKeysRequest::default()), &before))
        .await
        .unwrap();
    kms_token(&[
        "revoke",
        "--data-dir",
        dir.to_str().unwrap(),
        "--principal",
        "revoked",
    ]);
    server.hangup();
    assert!(server.log_eventually("tokens file reloaded").await);

    // An import token for GetImportToken to read.
    ImportTokenServiceClient::new(fixture.channel.clone())
        .create_import_token(fixture.admin(CreateImportTokenRequest {
            expiration: None,
            max_allowed_retrievals: Some(500),
        }))
        .await
        .unwrap();

    let mut made = Vec::new();
    for rpc in Rpc::ALL {
        for caller in CALLERS {
            let correlation = uuid::Uuid::new_v4().to_string();
            let (code, key) = fixture.call(rpc, caller, &correlation).await;
            assert_eq!(code, caller.expected(rpc), "{} as {caller:?}", rpc.name());
            made.push((rpc, caller, code, key, correlation));
        }
    }

    // Every call above, allowed or refused, is on the trail with the right fields.
    let events = common::audit_events(&server, &tenant, ListAuditEventsRequest::default()).await;
    let by_correlation: HashMap<&str, &AuditEvent> = events
        .iter()
        .map(|e| (e.correlation_id.as_str(), e))
        .collect();
    assert_eq!(by_correlation.len(), events.len(), "one record per call");
    for (rpc, caller, code, key, correlation) in &made {
        let event = by_correlation
            .get(correlation.as_str())
            .unwrap_or_else(|| panic!("no audit record of {} as {caller:?}", rpc.name()));
        assert_eq!(event.operation, rpc.name());
        assert_eq!(
            event.principal,
            caller.principal(),
            "{} as {caller:?}",
            rpc.name()
        );
        assert_eq!(event.instance, tenant);
        assert_eq!(event.code, *code as i32);
        assert!(event.peer.starts_with("127.0.0.1:"), "{}", event.peer);
        match key {
            // An unauthenticated call is refused before its body is read.
            _ if event.principal == "anonymous" => assert!(event.key_id.is_empty()),
            Some(key) => assert_eq!(&event.key_id, key, "{} as {caller:?}", rpc.name()),
            None => {}
        }
        assert_eq!(event.hash.len(), 64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_instance_stays_not_found_and_star_is_no_instance() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let (mine, theirs) = (instance(), instance());
    let admin_of_mine = create_principal(data.path(), "mine", &[&format!("{mine}=Administrator")]);
    let server = TestServer::start(&token, data.path()).await;
    let mut admin = server.keys().await;
    let their_key = common::create_key(
        &mut admin,
        &theirs,
        CreateKeyRequest {
            name: "theirs".into(),
            ..Default::default()
        },
    )
    .await;
    let mut keys = KeyServiceClient::new(server.channel_with(&admin_of_mine).await);
    let status = keys
        .get_key(req(
            &mine,
            GetKeyRequest {
                id: their_key.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = keys
        .delete_key(req(
            &mine,
            DeleteKeyRequest {
                id: their_key.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // "*" only means every instance inside the tokens file, even for an admin of "*".
    for client in [&mut keys, &mut admin] {
        let status = client
            .list_keys(req("*", ListKeysRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("bluemix-instance"),
            "{}",
            status.message()
        );
    }
    // Naming the role that is lacking, and only for a known principal.
    let viewer = create_principal(data.path(), "viewer", &[&format!("{mine}=Viewer")]);
    server.hangup();
    assert!(server.log_eventually("tokens file reloaded").await);
    let mut keys = KeyServiceClient::new(server.channel_with(&viewer).await);
    let status = keys
        .create_key(req(&mine, CreateKeyRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("Editor"), "{}", status.message());
    // An Administrator of one instance reads only that instance's trail.
    let mut audit = AuditServiceClient::new(server.channel_with(&admin_of_mine).await);
    let status = audit
        .list_audit_events(req(
            &mine,
            ListAuditEventsRequest {
                all_instances: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let events = audit
        .list_audit_events(req(&mine, ListAuditEventsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(!events.is_empty());
    assert!(events.iter().all(|e| e.instance == mine));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_comes_first_and_says_the_same_for_every_failure() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&token, data.path()).await;
    let mut keys = KeyServiceClient::new(server.channel().await);
    let mut messages = Vec::new();
    let unknown = kms::auth::BearerToken::generate().unwrap();
    for header in [
        None,
        Some("Bearer".to_owned()),
        Some("Bearer kms_short".to_owned()),
        Some(format!("Basic {}", server.admin_token)),
        Some(format!("Bearer {}", unknown.expose())),
    ] {
        // Malformed in every other way too: no instance, a bad key id.
        let mut request = Request::new(GetKeyRequest {
            id: "not-a-uuid".into(),
        });
        if let Some(header) = header {
            request
                .metadata_mut()
                .insert("authorization", MetadataValue::try_from(header).unwrap());
        }
        let status = keys.get_key(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        messages.push(status.message().to_owned());
    }
    messages.dedup();
    assert_eq!(messages.len(), 1, "{messages:?}");

    // Even a request gRPC would refuse undecoded (here 4 MiB, over the 64 KiB limit)
    // tells an unauthenticated caller only that it is not authenticated, and is audited.
    let tenant = instance();
    let status = keys
        .wrap_key(req(
            &tenant,
            WrapKeyRequest {
                id: uuid::Uuid::new_v4().to_string(),
                plaintext: None,
                aad: vec![String::new(); 2_000_000],
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.message(), messages[0]);
    let recorded = common::audit_events(
        &server,
        &tenant,
        ListAuditEventsRequest {
            operation: "WrapKey".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].principal, "anonymous");
    assert_eq!(recorded[0].code, Code::Unauthenticated as i32);

    // A repeated header is refused, not "first one wins".
    for header in ["authorization", "bluemix-instance"] {
        let mut request = req(&instance(), CountKeysRequest::default());
        let bearer = format!("Bearer {}", server.admin_token);
        let value = if header == "authorization" {
            bearer.clone()
        } else {
            "tenant-x".to_owned()
        };
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(bearer.as_str()).unwrap(),
        );
        request
            .metadata_mut()
            .append(header, MetadataValue::try_from(value.as_str()).unwrap());
        let status = keys.count_keys(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{header}");
        assert!(status.message().contains(header), "{}", status.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_file_that_does_not_parse_leaves_the_tokens_in_force() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let tenant = instance();
    let app = create_principal(data.path(), "app", &[&format!("{tenant}=Viewer")]);
    let server = TestServer::start(&token, data.path()).await;
    let mut keys = KeyServiceClient::new(server.channel_with(&app).await);
    let count = || req(&tenant, ListKeysRequest::default());
    assert_eq!(
        keys.list_keys(count()).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let tokens_file = data.path().join("tokens.toml");
    let good = std::fs::read_to_string(&tokens_file).unwrap();
    std::fs::write(&tokens_file, "[[principal]]\nname = 3\n").unwrap();
    server.hangup();
    assert!(server.log_eventually("tokens file refused").await);
    assert_eq!(
        keys.list_keys(count()).await.unwrap_err().code(),
        Code::PermissionDenied,
        "still known, still a Viewer"
    );
    std::fs::write(&tokens_file, good).unwrap();

    // `kms token list` shows principals and roles, never digests.
    let listed = kms_token(&["list", "--data-dir", data.path().to_str().unwrap()]);
    assert!(listed.contains("app\t") && listed.contains(&format!("{tenant}=Viewer")));
    let digest = kms::auth::BearerToken::parse(&app)
        .unwrap()
        .digest()
        .to_hex();
    assert!(!listed.contains(&digest) && !listed.contains(&app));
}
