//! Console logins with a Kubernetes token: TokenReview says who the token is, and
//! SubjectAccessReview whether that user may update Servers (the right an operator of
//! the fleet needs). Anything less is no login.

use std::future::Future;
use std::pin::Pin;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Api;
use kube::api::PostParams;

use crate::core::CredentialReviewer;

/// Reviews console tokens with the cluster.
pub struct KubeReviewer {
    pub client: kube::Client,
}

impl CredentialReviewer for KubeReviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Option<String>, String>> + Send + 'a>> {
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    ..Default::default()
                },
                ..Default::default()
            };
            let reviewed = Api::<TokenReview>::all(self.client.clone())
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| format!("TokenReview: {e}"))?;
            let Some(status) = reviewed.status.filter(|s| s.authenticated == Some(true)) else {
                return Ok(None);
            };
            let user = status.user.unwrap_or_default();
            let access = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: user.username.clone(),
                    groups: user.groups.clone(),
                    uid: user.uid.clone(),
                    extra: user.extra.clone(),
                    resource_attributes: Some(ResourceAttributes {
                        group: Some("metal.arges.dev".into()),
                        resource: Some("servers".into()),
                        verb: Some("update".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let allowed = Api::<SubjectAccessReview>::all(self.client.clone())
                .create(&PostParams::default(), &access)
                .await
                .map_err(|e| format!("SubjectAccessReview: {e}"))?
                .status
                .is_some_and(|s| s.allowed);
            Ok(allowed.then(|| format!("kubernetes {}", user.username.unwrap_or_default())))
        })
    }
}
